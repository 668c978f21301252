#!/usr/bin/env python3
"""Builds tests/data/jpeg/corpus.parquet: JPEGs as feeds carry them, with the pixels a reference
decoder (Pillow, i.e. libjpeg-turbo) gives, for the truncation policy test (README, "Truncated and
unsupported images").

Per source picture (grey and RGB, baseline and progressive, 4:2:0 and 4:4:4 chroma, sizes that are
and are not multiples of the block size): `full`, `no-eoi` (only the final FF D9 removed), and
`cut-30` / `cut-70` / `cut-95` (the file cut at that fraction of its length). Columns: id, variant,
image (the JPEG bytes), ref_mode (L or RGB), ref_width, ref_height, ref_pixels (Pillow's decode of
that file with truncated images allowed, row-major interleaved; null when it decodes nothing),
ref_equals_full (whether those pixels are the full file's: libjpeg recovers a missing end marker
exactly, and fills what a cut file lacks with grey).

Also writes tests/data/jpeg/arithmetic.jpg and arithmetic-progressive.jpg: valid arithmetic-coded
JPEGs of one corpus picture, made losslessly by libjpeg-turbo's `jpegtran -arithmetic` (Debian's
libjpeg-turbo-progs; skipped with a note when jpegtran is missing).

Run: python3 scripts/make_jpeg_corpus.py  (Pillow and pyarrow; deterministic). Tests read the files
only; they never need Pillow or jpegtran.
"""
import io
import math
import random
import shutil
import subprocess
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageFile

OUT = Path(__file__).resolve().parent.parent / "tests/data/jpeg/corpus.parquet"


def picture(w, h, mode, seed):
    """A photo-like picture: smooth gradients, a few shapes, mild noise."""
    rnd = random.Random(seed)
    im = Image.new("RGB", (w, h))
    px = im.load()
    cx, cy = rnd.uniform(0, w), rnd.uniform(0, h)
    for y in range(h):
        for x in range(w):
            r = math.hypot(x - cx, y - cy)
            v = [
                int(127 + 100 * math.sin(r / 5 + k) + rnd.gauss(0, 6)) for k in range(3)
            ]
            if (x // 7 + y // 9) % 5 == 0:
                v = [255 - c for c in v]
            px[x, y] = tuple(max(0, min(255, c)) for c in v)
    return im.convert(mode)


def decode(data):
    """Pillow's pixels and whether libjpeg needed the truncated-image allowance."""
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        im = Image.open(io.BytesIO(data))
        im.load()
        complete = True
    except OSError:
        ImageFile.LOAD_TRUNCATED_IMAGES = True
        try:
            im = Image.open(io.BytesIO(data))
            im.load()
        except OSError:  # cut inside the headers: libjpeg decodes nothing
            return None, (None, None), None, False
        complete = False
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = False
    return im.mode, im.size, im.tobytes(), complete


def main():
    rows = []
    configs = [
        ("grey-base-28", 28, 28, "L", dict(quality=90)),
        ("grey-prog-45x37", 45, 37, "L", dict(quality=85, progressive=True)),
        ("rgb-base-420-32", 32, 32, "RGB", dict(quality=90, subsampling=2)),
        ("rgb-base-444-41x29", 41, 29, "RGB", dict(quality=95, subsampling=0)),
        ("rgb-prog-420-64x48", 64, 48, "RGB", dict(quality=80, subsampling=2, progressive=True)),
        ("rgb-base-420-100x75", 100, 75, "RGB", dict(quality=75, subsampling=2)),
    ]
    for seed, (name, w, h, mode, opts) in enumerate(configs):
        buf = io.BytesIO()
        picture(w, h, mode, seed).save(buf, "JPEG", **opts)
        full = buf.getvalue()
        assert full.endswith(b"\xff\xd9")
        variants = {"full": full, "no-eoi": full[:-2]}
        for pct in (30, 70, 95):
            variants[f"cut-{pct}"] = full[: len(full) * pct // 100]
        full_pixels = decode(full)[2]
        for variant, data in variants.items():
            m, (rw, rh), pixels, _ = decode(data)
            rows.append(
                dict(
                    id=f"{name}/{variant}",
                    variant=variant,
                    image=data,
                    ref_mode=m,
                    ref_width=rw,
                    ref_height=rh,
                    ref_pixels=pixels,
                    ref_equals_full=pixels == full_pixels,
                )
            )
    OUT.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), OUT, compression="zstd")
    print(f"wrote {len(rows)} rows to {OUT}")
    arithmetic(next(r["image"] for r in rows if r["id"] == "rgb-base-420-32/full"))
    for r in rows:
        print(f"  {r['id']:32} {len(r['image']):6} bytes  equals full: {r['ref_equals_full']}")


def arithmetic(jpeg):
    """Arithmetic-coded copies of `jpeg` (sequential and progressive) via jpegtran."""
    if shutil.which("jpegtran") is None:
        print("jpegtran not found (apt install libjpeg-turbo-progs): arithmetic files not rebuilt")
        return
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "in.jpg"
        src.write_bytes(jpeg)
        for name, extra in [("arithmetic.jpg", []), ("arithmetic-progressive.jpg", ["-progressive"])]:
            out = OUT.parent / name
            subprocess.run(["jpegtran", "-arithmetic", *extra, "-outfile", str(out), str(src)], check=True)
            print(f"wrote {out}")


if __name__ == "__main__":
    main()
