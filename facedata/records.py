"""Sample statuses and the column layout shared by every stage.

A sample is a row; a shard is a batch of rows. Every row that enters a shard leaves it with a
`status`: `ok`, or the first reason it was dropped. Stages add columns, they never drop rows.
"""

from __future__ import annotations

OK = "ok"

# Input problems (found while ingesting).
MISSING_URL = "missing_url"
INVALID_URL = "invalid_url"  # not parseable, or a scheme other than http(s)
DUPLICATE_URL = "duplicate_url"
FILE_NOT_FOUND = "file_not_found"

# Download problems. HTTP errors are "http_<code>", e.g. "http_404"; see http_status().
TIMEOUT = "timeout"
CONNECTION_ERROR = "connection_error"
TOO_MANY_REDIRECTS = "too_many_redirects"
TOO_LARGE = "too_large"  # body over download.max_bytes
TRUNCATED = "truncated"  # body shorter than its Content-Length
NOT_IMAGE = "not_image"  # content type or magic bytes say this is not an image
OPTED_OUT = "opted_out"  # X-Robots-Tag: noai / noimageai

# Image problems (found while decoding and filtering).
DECODE_ERROR = "decode_error"
DECOMPRESSION_BOMB = "decompression_bomb"
TOO_SMALL = "too_small"  # shorter side under image.min_side
BAD_ASPECT = "bad_aspect"  # aspect ratio over image.max_aspect


def http_status(code: int) -> str:
    return f"http_{code}"


# Face problems (found by the face stage in images that passed every stage before it).
NO_FACE = "no_face"  # no face scores at least faces.filter.min_score
TOO_FEW_FACES = "too_few_faces"  # fewer than faces.filter.min_faces
TOO_MANY_FACES = "too_many_faces"  # more than faces.filter.max_faces
FACE_TOO_SMALL = "face_too_small"  # primary face's shorter side under faces.filter.min_face_side
FACE_RATIO_TOO_SMALL = "face_ratio_too_small"  # primary face's area / image area under min_area_ratio
FACE_POSE = "face_pose"  # primary face's |yaw| over faces.filter.max_abs_yaw

# Identity problems (found by the identity stage across all shards).
OPTOUT_MATCH = "optout_match"  # a face matches the opt-out gallery
NEAR_DUPLICATE = "near_duplicate"  # another image of the same face, better by resolution/sharpness/score
IDENTITY_OUTLIER = "identity_outlier"  # primary face far from its identity's centre
IDENTITY_CAP = "identity_cap"  # over identity.max_images_per_identity
SINGLETON_IDENTITY = "singleton_identity"  # the only image of its identity (identity.drop_singletons)

# Caption problems (found by the attribute stage).
TOO_FEW_ATTRIBUTES = "too_few_attributes"  # primary face under attributes.min_valid_labels confident labels
LOW_RELEVANCE = "low_relevance"  # image-text CLIP score under relevance.min_score
