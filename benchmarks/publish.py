"""Publish throughput and memory: `facedata.publish.writer.publish_run` on runs of 1,000 and 10,000 kept samples,
against `datasets.Dataset.from_generator(...).to_parquet(...)` writing the same rows.

    .venv/bin/python benchmarks/publish.py                  # 1k and 10k, crops at 10k, baseline; ~2 min (+1.5 min once)
    .venv/bin/python benchmarks/publish.py --quick          # 200 and 1,000 samples, ~40 s
    .venv/bin/python benchmarks/publish.py --sizes 1000 10000 --no-crops --no-baseline

Source runs (built once, cached under benchmarks/_work/publish_run_N/): `facedata demo` is run once
(benchmarks/_work/publish_demo/, ~30-60 s: 61 rows in 4 shards, 38 kept), and its finished shards are
replicated until the run has exactly N kept samples. Copy c gets shard ids c*4+s and keys c*100+k (9
digits), rewritten in every parquet (shards/, faces/, identity/, captions/) and in the member names of
shards/NNNNN.tar; identity ids (identity_id, face_identity_ids) are offset by c*(largest id + 1), so every
copy has identities of its own and the splits stay identity-disjoint. Every stored image gets a marker of
its copy (a JPEG comment segment, a PNG tEXt chunk), so no two samples share bytes: parquet's dictionary
encoding would otherwise fold the repeats and flatter the output size. The surplus kept rows of the last
copy get status `identity_cap` in captions/, so the run holds exactly N kept samples. Embeddings
(faces/*.npy, identical per copy) are hard links.

Contenders, each in its own subprocess (threads 1: OMP_NUM_THREADS=1, pyarrow's pools at 1), warmed up
first on the demo run itself (imports, matplotlib's first figure, datasets' first cache):
- publish: `publish_run(RUN, DEST, progress=False)` (parquet + webdataset + card + manifest), and with
  `crops=True` (the primary face crop re-encoded as the webdataset image) at the largest size;
- datasets: `Dataset.from_generator(gen, features={key, image: Image(), caption}, cache_dir=...)`
  then `.to_parquet(DEST/data.parquet)`; the generator reads the same run with
  `facedata.publish.writer.iter_samples`, so both sides pay the same reading cost.

Figures: samples/s (wall), samples per CPU-second (user + system of the subprocess, steadier on a
shared machine), peak RSS (ru_maxrss of the subprocess) and its value after the warm-up, RSS at the end
split into anonymous and file-backed pages (datasets' memory-mapped Arrow cache counts in RSS), the output's
size, and peak RSS at the largest size over the smallest (goal for publish: flat, ~1.0x).
Printed side by side and written to benchmarks/_work/publish.json; outputs are removed after measuring.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import shutil
import struct
import subprocess
import sys
import tarfile
import time
import zlib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WORK = REPO / "benchmarks" / "_work"
DEMO = WORK / "publish_demo"
OUT = WORK / "publish_out"
KEY_STRIDE = 100  # keys of copy c are c * KEY_STRIDE + original key; the demo has 61 rows
TRIMMED_STATUS = "identity_cap"
sys.path.insert(0, str(REPO))


# ------------------------------------------------------------------------------------------- source run

def demo_run() -> Path:
    """`facedata demo`'s finished run, made once."""
    run = DEMO / "run"
    if not (run / "summary.json").exists():
        shutil.rmtree(DEMO, ignore_errors=True)
        print(f"building {DEMO} with `facedata demo` (~30-60 s)", flush=True)
        subprocess.run([str(REPO / ".venv" / "bin" / "facedata"), "demo", "--output", str(DEMO), "--no-progress"],
                       check=True, stdout=subprocess.DEVNULL)
    return run


def _shard_ids(run: Path) -> list[int]:
    return sorted(int(p.name[:5]) for p in (run / "captions").glob("*.stats.json"))


def _new_key(key: str, copy: int) -> str:
    value = int(key)
    if not 0 <= value < KEY_STRIDE:
        raise SystemExit(f"demo key {key!r} is over {KEY_STRIDE}; raise KEY_STRIDE")
    return f"{copy * KEY_STRIDE + value:09d}"


def _rewrite_parquet(src: Path, dst: Path, copy: int, id_offset: int, trim: set[str] | None = None) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(src)
    names = table.schema.names

    def replace(column: str, values: list) -> None:
        nonlocal table
        i = names.index(column)
        table = table.set_column(i, table.schema.field(i), pa.array(values, table.schema.field(i).type))

    keys = table.column("key").to_pylist()
    replace("key", [_new_key(k, copy) for k in keys])
    if "identity_id" in names:
        replace("identity_id", [v + id_offset if v is not None and v >= 0 else v
                                for v in table.column("identity_id").to_pylist()])
    if "face_identity_ids" in names:
        replace("face_identity_ids", [None if ids is None else [v + id_offset if v is not None and v >= 0 else v
                                                                 for v in ids]
                                      for ids in table.column("face_identity_ids").to_pylist()])
    if trim:
        replace("status", [TRIMMED_STATUS if k in trim else s
                           for k, s in zip(keys, table.column("status").to_pylist())])
    pq.write_table(table, dst)


def _tag_image(data: bytes, ext: str, copy: int) -> bytes:
    """The image with a marker of its copy, so that no two samples share bytes (parquet's dictionary
    encoding would otherwise fold the repeated images): a JPEG comment segment, a PNG tEXt chunk."""
    text = f"facedata benchmark copy {copy}".encode()
    if ext in ("jpg", "jpeg") and data[:2] == b"\xff\xd8":
        return data[:2] + b"\xff\xfe" + struct.pack(">H", len(text) + 2) + text + data[2:]
    if ext == "png" and data[:8] == b"\x89PNG\r\n\x1a\n":
        chunk = b"tEXt" + b"comment\0" + text
        end = 8 + 8 + struct.unpack(">I", data[8:12])[0] + 4  # after the IHDR chunk
        crc = struct.pack(">I", zlib.crc32(chunk))
        return data[:end] + struct.pack(">I", len(chunk) - 4) + chunk + crc + data[end:]
    return data + text  # trailing bytes, ignored by decoders


def _rewrite_tar(src: Path, dst: Path, copy: int) -> None:
    with tarfile.open(src, "r|") as tin, tarfile.open(dst, "w", format=tarfile.PAX_FORMAT) as tout:
        for member in tin:
            key, dot, ext = member.name.partition(".")
            member.name = _new_key(key, copy) + dot + ext
            if not member.isfile():
                tout.addfile(member)
                continue
            data = tin.extractfile(member).read()
            if ext in ("jpg", "jpeg", "png", "webp"):
                data = _tag_image(data, ext, copy)
            member.size = len(data)
            tout.addfile(member, io.BytesIO(data))


def _copy_stats(src: Path, dst: Path, shard_id: int) -> None:
    stats = json.loads(src.read_text())
    if "shard_id" in stats:
        stats["shard_id"] = shard_id
    dst.write_text(json.dumps(stats, indent=2, sort_keys=True) + "\n")


def _link(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def prepare_run(n: int) -> Path:
    """A finished run of exactly n kept samples, replicated from the demo run (built once)."""
    import pyarrow.parquet as pq

    from facedata.core.shards import shard_name

    run = WORK / f"publish_run_{n}"
    if (run / "prepared.json").exists():
        return run
    demo = demo_run()
    ids = _shard_ids(demo)
    kept_keys = {i: [r["key"] for r in pq.read_table(demo / "captions" / f"{shard_name(i)}.parquet",
                                                    columns=["key", "status"]).to_pylist() if r["status"] == "ok"]
                 for i in ids}
    per_copy = sum(len(k) for k in kept_keys.values())
    max_identity = max((v for i in ids for v in pq.read_table(demo / "captions" / f"{shard_name(i)}.parquet",
                                                               columns=["identity_id"]).column(0).to_pylist()
                        if v is not None), default=0)
    copies = -(-n // per_copy)
    surplus = copies * per_copy - n
    # The last copy's surplus: its last kept samples, in shard order.
    trim = {k for i in ids for k in kept_keys[i]}
    trim = set(sorted(trim)[len(trim) - surplus:]) if surplus else set()
    print(f"building {run}: {copies} copies of the demo run ({len(ids)} shards, {per_copy} kept each), "
          f"{len(trim)} samples of the last copy trimmed", flush=True)
    start = time.perf_counter()
    shutil.rmtree(run, ignore_errors=True)
    for sub in ("shards", "faces", "identity", "captions"):
        (run / sub).mkdir(parents=True)
    shutil.copyfile(demo / "config.yaml", run / "config.yaml")
    if (demo / "identity" / "identity.json").exists():
        shutil.copyfile(demo / "identity" / "identity.json", run / "identity" / "identity.json")
    for copy in range(copies):
        offset = copy * (max_identity + 1)
        last = copy == copies - 1
        for i in ids:
            src, new = shard_name(i), shard_name(copy * len(ids) + i)
            _rewrite_tar(demo / "shards" / f"{src}.tar", run / "shards" / f"{new}.tar", copy)
            for sub in ("shards", "faces", "identity"):
                if (demo / sub / f"{src}.parquet").exists():
                    _rewrite_parquet(demo / sub / f"{src}.parquet", run / sub / f"{new}.parquet", copy, offset)
            _rewrite_parquet(demo / "captions" / f"{src}.parquet", run / "captions" / f"{new}.parquet", copy, offset,
                             trim if last else None)
            for sub in ("shards", "faces", "captions"):
                if (demo / sub / f"{src}.stats.json").exists():
                    _copy_stats(demo / sub / f"{src}.stats.json", run / sub / f"{new}.stats.json",
                                copy * len(ids) + i)
            if (demo / "faces" / f"{src}.embeddings.npy").exists():
                _link(demo / "faces" / f"{src}.embeddings.npy", run / "faces" / f"{new}.embeddings.npy")
    summary = json.loads((demo / "summary.json").read_text())
    summary.update({"n_samples": summary.get("n_samples", 0) * copies, "n_ok": n, "n_shards": copies * len(ids)})
    (run / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    size = sum(p.stat().st_size for p in run.rglob("*") if p.is_file())
    (run / "prepared.json").write_text(json.dumps({"kept": n, "copies": copies, "shards": copies * len(ids),
                                                   "bytes": size}))
    print(f"  built in {time.perf_counter() - start:.0f} s, {size / 1e6:,.0f} MB", flush=True)
    return run


# ---------------------------------------------------------------------------------------------- workers

def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _rss_now_mb() -> dict:
    """Resident memory now, split into anonymous (heap) and file-backed (mapped files) pages."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("RssAnon", "RssFile"):
            fields[name] = round(int(value.split()[0]) / 1024)
    return {"rss_anon_end_mb": fields.get("RssAnon"), "rss_file_end_mb": fields.get("RssFile")}


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def _hf_rows(run: str):
    from facedata.publish.writer import find_shards, iter_samples

    for sample in iter_samples(find_shards(Path(run))):
        key = sample.record["key"]
        yield {"key": key, "image": {"bytes": sample.image, "path": f"{key}.{sample.ext}"},
               "caption": sample.record.get("face_caption")}


def _hf_write(run: Path, dest: Path) -> dict:
    from datasets import Dataset, Features, Image, Value

    features = Features({"key": Value("string"), "image": Image(), "caption": Value("string")})
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    start = time.perf_counter()
    ds = Dataset.from_generator(_hf_rows, features=features, cache_dir=str(dest / "cache"),
                                gen_kwargs={"run": str(run)})
    generate_s = time.perf_counter() - start
    ds.to_parquet(str(dest / "data.parquet"))
    return {"n": len(ds), **_rss_now_mb(), "generate_s": generate_s,
            "to_parquet_s": time.perf_counter() - start - generate_s,
            "parquet_bytes": (dest / "data.parquet").stat().st_size, "cache_bytes": _size(dest / "cache")}


def worker(kind: str, n: int, crops: bool) -> dict:
    import pyarrow as pa

    pa.set_cpu_count(1)
    pa.set_io_thread_count(1)
    import datasets  # noqa: F401 - both sides import it (publish builds its schema with it)

    import facedata.publish.card
    from facedata.publish.writer import publish_run

    run = prepare_run(n)
    tag = f"{kind}-{n}{'-crops' if crops else ''}"
    dest = OUT / tag
    warm = OUT / f"warmup-{tag}"
    card_s = []
    write_card = facedata.publish.card.write_dataset_card

    def timed_card(*args, **kwargs):
        t = time.perf_counter()
        try:
            return write_card(*args, **kwargs)
        finally:
            card_s.append(time.perf_counter() - t)

    facedata.publish.card.write_dataset_card = timed_card
    if kind == "publish":
        publish_run(demo_run(), warm, overwrite=True, crops=crops, progress=False)
    else:
        _hf_write(demo_run(), warm)
    shutil.rmtree(warm, ignore_errors=True)
    shutil.rmtree(dest, ignore_errors=True)
    rss_warm = _peak_rss_mb()
    wall, cpu = time.perf_counter(), _cpu_seconds()
    extra = {}
    if kind == "publish":
        manifest = publish_run(run, dest, crops=crops, progress=False)
        samples = manifest["n_samples"]
        extra.update(_rss_now_mb())
        extra["card_s"] = round(card_s[-1], 2)
        extra["files"] = len(manifest["files"]) + 1
        extra["splits"] = {s: v["num_examples"] for s, v in manifest["splits"].items()}
    else:
        out = _hf_write(run, dest)
        samples = out["n"]
        extra = {"rss_anon_end_mb": out["rss_anon_end_mb"], "rss_file_end_mb": out["rss_file_end_mb"],
                 "generate_s": round(out["generate_s"], 2), "to_parquet_s": round(out["to_parquet_s"], 2),
                 "parquet_mb": round(out["parquet_bytes"] / 1e6, 1), "cache_mb": round(out["cache_bytes"] / 1e6, 1)}
    wall, cpu = time.perf_counter() - wall, _cpu_seconds() - cpu
    size = _size(dest)
    shutil.rmtree(dest, ignore_errors=True)
    return {"contender": kind + (" crops" if crops else ""), "n": n, "samples": samples,
            "wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "samples_per_s": round(samples / wall, 1),
            "samples_per_cpu_s": round(samples / cpu, 1), "rss_after_warmup_mb": round(rss_warm),
            "peak_rss_mb": round(_peak_rss_mb()), "output_mb": round(size / 1e6, 1), **extra}


def run_worker(kind: str, n: int, crops: bool) -> dict:
    out = WORK / f"publish-{kind}-{n}{'-crops' if crops else ''}.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "TQDM_DISABLE": "1"}
    subprocess.run([sys.executable, __file__, "--worker", kind, "--sizes", str(n), "--out", str(out)]
                   + (["--crops"] if crops else []), check=True, env=env)
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000], help="kept samples per run")
    parser.add_argument("--quick", action="store_true", help="200 and 1,000 samples")
    parser.add_argument("--no-crops", action="store_true", help="skip publish with crops=True at the largest size")
    parser.add_argument("--no-baseline", action="store_true", help="skip datasets.Dataset.from_generator")
    parser.add_argument("--worker", choices=["publish", "datasets"])
    parser.add_argument("--crops", action="store_true")
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.quick:
        args.sizes = [200, 1000]
    if args.worker:
        Path(args.out).write_text(json.dumps(worker(args.worker, args.sizes[0], args.crops)))
        return
    sizes = sorted(args.sizes)
    for n in sizes:
        prepare_run(n)
    plan = [("publish", n, False) for n in sizes]
    if not args.no_crops:
        plan.append(("publish", sizes[-1], True))
    if not args.no_baseline:
        plan += [("datasets", n, False) for n in sizes]
    rows = []
    for kind, n, crops in plan:
        rows.append(run_worker(kind, n, crops))
        print(json.dumps(rows[-1]), flush=True)
    print(f"\n{'contender':<15}{'samples':>8}{'wall s':>8}{'samples/s':>11}{'/CPU-s':>8}{'RSS warm':>10}"
          f"{'peak RSS':>10}{'output MB':>11}")
    for r in rows:
        print(f"{r['contender']:<15}{r['samples']:>8}{r['wall_s']:>8}{r['samples_per_s']:>11}"
              f"{r['samples_per_cpu_s']:>8}{r['rss_after_warmup_mb']:>10}{r['peak_rss_mb']:>10}{r['output_mb']:>11}")
    small, large = sizes[0], sizes[-1]
    by = {(r["contender"], r["n"]): r for r in rows}
    for kind in ("publish", "datasets"):
        if (kind, small) in by and (kind, large) in by and small != large:
            a, b = by[(kind, small)], by[(kind, large)]
            print(f"{kind}: peak RSS {large:,} / {small:,} samples = {b['peak_rss_mb'] / a['peak_rss_mb']:.2f}x "
                  f"(growth over warm-up: {a['peak_rss_mb'] - a['rss_after_warmup_mb']} -> "
                  f"{b['peak_rss_mb'] - b['rss_after_warmup_mb']} MB)")
    if ("publish", large) in by and ("datasets", large) in by:
        p, d = by[("publish", large)], by[("datasets", large)]
        print(f"publish / datasets at {large:,}: samples/s {p['samples_per_s'] / d['samples_per_s']:.2f}x, "
              f"per CPU-s {p['samples_per_cpu_s'] / d['samples_per_cpu_s']:.2f}x, "
              f"peak RSS {p['peak_rss_mb'] / d['peak_rss_mb']:.2f}x")
    (WORK / "publish.json").write_text(json.dumps({"sizes": sizes, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
