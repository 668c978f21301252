#!/usr/bin/env python3
"""Builds the out-of-distribution test sets of tests/data/ood/ (28x28 8-bit grey PNGs in Parquet,
the schema of ../shared/datasets: id utf8, label int32, image binary).

These sets are for tests and for choosing nothing: the detection score is chosen on in-distribution
data and general data only (models/README.md, "Choosing the score"). They are kinds of OOD input the
score was not chosen for:

- glyphs.parquet: letters of the Latin, Greek, Cyrillic, Armenian, Georgian and Hebrew alphabets
  in the DejaVu fonts (Debian package fonts-dejavu-core / fonts-dejavu-extra), white on black,
  rendered the way MNIST digits were prepared (glyph scaled into a 20x20 box, centred by its
  centre of mass in 28x28), and a quarter of them scaled to fill the frame (notMNIST-like).
- noise.parquet: i.i.d. uniform 8-bit noise (half) and Gaussian noise N(128, 50^2), clipped (half).
- constant.parquet: constant images, every grey level 0..255 twice.

Natural photo crops come from ../shared/datasets/natural_patches_train.parquet (tests read it
there). Deterministic: the same fonts give the same files.

Usage: python3 scripts/make_ood_sets.py [--out tests/data/ood] [--fonts /usr/share/fonts/truetype/dejavu]
Needs numpy, pillow, pyarrow (PyPI).
"""

import argparse
import glob
import io
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw, ImageFont

ALPHABETS = {
    "latin": [chr(c) for c in range(ord("A"), ord("Z") + 1)]
    + [chr(c) for c in range(ord("a"), ord("z") + 1)],
    "greek": [chr(c) for c in range(0x391, 0x3AA) if c != 0x3A2]
    + [chr(c) for c in range(0x3B1, 0x3CA)],
    "cyrillic": [chr(c) for c in range(0x410, 0x450)],
    "armenian": [chr(c) for c in range(0x531, 0x557)],
    "georgian": [chr(c) for c in range(0x10D0, 0x10F1)],
    "hebrew": [chr(c) for c in range(0x5D0, 0x5EB)],
}


def png(a: np.ndarray) -> bytes:
    b = io.BytesIO()
    Image.fromarray(a.astype(np.uint8), mode="L").save(b, format="PNG")
    return b.getvalue()


def draw(ch: str, font: ImageFont.FreeTypeFont) -> np.ndarray:
    img = Image.new("L", (160, 160), 0)
    ImageDraw.Draw(img).text((20, 10), ch, fill=255, font=font)
    return np.asarray(img)


def render(ch: str, font: ImageFont.FreeTypeFont, missing: np.ndarray) -> np.ndarray | None:
    """The glyph white on black, cropped to its ink; None when the font lacks it (it draws
    the same box as for a private-use code point)."""
    a = draw(ch, font)
    ys, xs = np.nonzero(a > 0)
    if len(ys) < 20 or np.array_equal(a, missing):
        return None
    return a[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]


def mnist_style(g: np.ndarray) -> np.ndarray:
    """Scaled (aspect kept) into a 20x20 box, placed by centre of mass in 28x28 (LeCun's recipe)."""
    h, w = g.shape
    s = 20.0 / max(h, w)
    nh, nw = max(1, round(h * s)), max(1, round(w * s))
    small = np.asarray(Image.fromarray(g).resize((nw, nh), Image.LANCZOS), dtype=np.float64)
    out = np.zeros((28, 28))
    m = small.sum()
    cy = (small.sum(1) * np.arange(nh)).sum() / m
    cx = (small.sum(0) * np.arange(nw)).sum() / m
    y0 = int(round(14 - cy))
    x0 = int(round(14 - cx))
    y0 = min(max(y0, 0), 28 - nh)
    x0 = min(max(x0, 0), 28 - nw)
    out[y0 : y0 + nh, x0 : x0 + nw] = small
    return np.clip(out, 0, 255)


def frame_filling(g: np.ndarray) -> np.ndarray:
    """Scaled (aspect kept) to fill 26 pixels, centred in 28x28 (notMNIST-like)."""
    h, w = g.shape
    s = 26.0 / max(h, w)
    nh, nw = max(1, round(h * s)), max(1, round(w * s))
    out = np.zeros((28, 28))
    y0, x0 = (28 - nh) // 2, (28 - nw) // 2
    out[y0 : y0 + nh, x0 : x0 + nw] = np.asarray(Image.fromarray(g).resize((nw, nh), Image.LANCZOS))
    return out


def glyphs(fonts_dir: str) -> list[tuple[str, int, bytes]]:
    rows = []
    fonts = sorted(glob.glob(os.path.join(fonts_dir, "*.ttf")))
    if not fonts:
        raise SystemExit(f"no fonts under {fonts_dir}")
    for fi, path in enumerate(fonts):
        font = ImageFont.truetype(path, 96)
        missing = draw("\ue000", font)
        stem = os.path.splitext(os.path.basename(path))[0]
        for ai, (alpha, chars) in enumerate(ALPHABETS.items()):
            for ci, ch in enumerate(chars):
                g = render(ch, font, missing)
                if g is None:
                    continue
                frame = (fi * 7 + ai * 3 + ci) % 4 == 0
                a = frame_filling(g) if frame else mnist_style(g)
                style = "frame" if frame else "mnist"
                rows.append((f"glyph-{stem}-{alpha}-{ord(ch):04x}-{style}", ai, png(a)))
    return rows


def noise(n: int, rng: np.random.Generator) -> list[tuple[str, int, bytes]]:
    rows = []
    for i in range(n):
        if i % 2 == 0:
            a = rng.integers(0, 256, size=(28, 28))
            kind = "uniform"
        else:
            a = np.clip(np.rint(rng.normal(128, 50, size=(28, 28))), 0, 255)
            kind = "gaussian"
        rows.append((f"noise-{kind}-{i:05d}", 0 if kind == "uniform" else 1, png(a)))
    return rows


def constant() -> list[tuple[str, int, bytes]]:
    return [
        (f"constant-{v:03d}-{r}", v, png(np.full((28, 28), v)))
        for v in range(256)
        for r in range(2)
    ]


def write(rows: list[tuple[str, int, bytes]], path: str) -> None:
    t = pa.table(
        {
            "id": pa.array([r[0] for r in rows], pa.string()),
            "label": pa.array([r[1] for r in rows], pa.int32()),
            "image": pa.array([r[2] for r in rows], pa.binary()),
        }
    )
    pq.write_table(t, path, compression="zstd")
    print(f"{path}: {len(rows)} rows, {os.path.getsize(path)} bytes")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="tests/data/ood")
    ap.add_argument("--fonts", default="/usr/share/fonts/truetype/dejavu")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    rng = np.random.default_rng(20261130)
    write(glyphs(a.fonts), os.path.join(a.out, "glyphs.parquet"))
    write(noise(1000, rng), os.path.join(a.out, "noise.parquet"))
    write(constant(), os.path.join(a.out, "constant.parquet"))


if __name__ == "__main__":
    main()
