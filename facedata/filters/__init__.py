"""Filters that web-scale image-text pipelines apply (LAION, DataComp, Data-Juicer, FaceID-6M), each a
step under facedata.core.step's contract, one module per filter.

On the input rows alone, before any download (subclasses of `Filter`, reading only input columns):
    caption_language.CaptionLanguage        py3langid; keep_languages, min_probability
    caption_text.CaptionText                length in words and characters, file names, URLs, boilerplate
    people_words.CaptionAboutPeople         FaceID-6M-style human-related word list (replaceable)
    metadata.MetadataThresholds             LAION columns: similarity, punsafe, NSFW tag, pwatermark, WIDTH/HEIGHT

On the downloaded images (ShardStep with needs_images=True):
    nsfw.UnsafeImages                       Open NSFW (ONNX) score per image
    text_overlay.TextOverlay                share of the image covered by text (PP-OCR detection)
    perceptual_hash.PerceptualHash          64-bit pHash (+ 18 crop hashes) per image as columns
    duplicates.find_duplicates              run-wide exact (sha256) and near (Hamming + pixel check) duplicates
    decontaminate.BenchmarkOverlap          near duplicates of a folder of evaluation images

Nothing here loads a model at import; models load on first use, from files their packages ship.
"""
