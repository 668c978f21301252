#!/usr/bin/env python3
"""glowwatch against the same Glow in PyTorch, side by side in one run, on the CPU (issue 18).

The PyTorch model below is written here from glowwatch's layer definitions (src/glow/*.rs), not
taken from elsewhere, so both sides do the same work: per scale a squeeze, K steps of per-channel
ActNorm -> LU-parametrised invertible 1x1 convolution -> affine coupling (network conv3x3 C/2->w,
ActNorm, ReLU, conv1x1 w->w, ActNorm, ReLU, zero-initialised conv3x3 w->C with bias and
exp(3 logs) output scale; s = sigmoid(raw + 2)), then the exit: half the channels (all at the last
scale) through a per-dimension ActNorm, scored under N(0, I).

Modes (the same on both sides):
  score       forward only, no gradients: glowwatch's fused scorer vs torch.inference_mode()
  train-step  forward + backward of the mean NLL and an Adamax update (lr 5e-4, coupled weight
              decay 5e-5, glowwatch's defaults; torch.optim.Adamax)
              (glowwatch: `bench --mode train-step`, what `glowwatch train` runs: the fused
              CPU path)
  train-step-outlier
              the same plus the outlier loss's second batch of general images through the
              model, against a frozen general model of the same size (glowwatch: its fused
              scorer; PyTorch: the module under no_grad), w = T = 300

Each round times glowwatch (`glowwatch bench ... --json`, median of its runs) and then PyTorch
(median of the same number of timed runs after warm-up), so the shared machine's drift hits both;
the table gives the medians over rounds and their ratio. PyTorch uses all cores (torch's default).

Usage:
  scripts/bench_torch.py [--glowwatch target/release/glowwatch] [--config small,small3,FILE.toml]
                         [--batch 64,256] [--mode score,train-step,train-step-outlier] [--rounds 3] [--runs 3]
Needs `pip install torch` (the tests never do).
"""

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib

import torch
import torch.nn.functional as F
from torch import nn

NAMED = {
    "small": dict(in_channels=1, image_size=32, scales=3, steps=8, hidden=128),
    "small1": dict(in_channels=1, image_size=32, scales=3, steps=8, hidden=128),
    "small3": dict(in_channels=3, image_size=32, scales=3, steps=8, hidden=128),
    "paper": dict(in_channels=3, image_size=32, scales=3, steps=32, hidden=512),
    "paper3": dict(in_channels=3, image_size=32, scales=3, steps=32, hidden=512),
    "paper1": dict(in_channels=1, image_size=32, scales=3, steps=32, hidden=512),
}


def config(name):
    if name in NAMED:
        return NAMED[name]
    with open(name, "rb") as f:
        c = tomllib.load(f)
    return {k: c[k] for k in ("in_channels", "image_size", "scales", "steps", "hidden")}


class ActNorm(nn.Module):
    """y = (x + loc) * exp(logs) per channel; log-det H*W*sum(logs)."""

    def __init__(self, c):
        super().__init__()
        self.loc = nn.Parameter(torch.zeros(1, c, 1, 1))
        self.logs = nn.Parameter(torch.zeros(1, c, 1, 1))

    def forward(self, x):
        return (x + self.loc) * self.logs.exp(), self.logs.sum() * x.shape[2] * x.shape[3]


class InvConv(nn.Module):
    """W = P L (U + diag(sign exp(logs))); log-det H*W*sum(logs)."""

    def __init__(self, c):
        super().__init__()
        q, _ = torch.linalg.qr(torch.randn(c, c, dtype=torch.float64))
        p, l, u = torch.linalg.lu(q)
        s = torch.diagonal(u)
        self.register_buffer("p", p.float())
        self.register_buffer("sign", torch.sign(s).float())
        self.register_buffer("lmask", torch.tril(torch.ones(c, c), -1))
        self.register_buffer("eye", torch.eye(c))
        self.lower = nn.Parameter(l.float())
        self.upper = nn.Parameter(torch.triu(u, 1).float())
        self.logs = nn.Parameter(s.abs().log().float())

    def forward(self, x):
        c = x.shape[1]
        l = self.lower * self.lmask + self.eye
        u = self.upper * self.lmask.T + torch.diag(self.sign * self.logs.exp())
        w = self.p @ l @ u
        return F.conv2d(x, w.view(c, c, 1, 1)), self.logs.sum() * x.shape[2] * x.shape[3]


class Coupling(nn.Module):
    def __init__(self, c, hidden):
        super().__init__()
        self.conv1 = nn.Conv2d(c // 2, hidden, 3, padding=1, bias=False)
        self.norm1 = ActNorm(hidden)
        self.conv2 = nn.Conv2d(hidden, hidden, 1, bias=False)
        self.norm2 = ActNorm(hidden)
        self.conv3 = nn.Conv2d(hidden, c, 3, padding=1)
        self.logs3 = nn.Parameter(torch.zeros(1, c, 1, 1))
        for conv in (self.conv1, self.conv2):
            nn.init.normal_(conv.weight, std=0.05)
        nn.init.zeros_(self.conv3.weight)
        nn.init.zeros_(self.conv3.bias)

    def forward(self, x):
        c = x.shape[1]
        xa, xb = x[:, : c // 2], x[:, c // 2 :]
        h = F.relu(self.norm1(self.conv1(xa))[0])
        h = F.relu(self.norm2(self.conv2(h))[0])
        h = self.conv3(h) * (3 * self.logs3).exp()
        shift, raw = h[:, 0::2], h[:, 1::2]
        log_s = F.logsigmoid(raw + 2)
        yb = (xb + shift) * log_s.exp()
        return torch.cat([xa, yb], 1), log_s.flatten(1).sum(1)


def squeeze(x):
    n, c, h, w = x.shape
    x = x.view(n, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
    return x.reshape(n, c * 4, h // 2, w // 2)


class Glow(nn.Module):
    def __init__(self, in_channels, image_size, scales, steps, hidden):
        super().__init__()
        self.scales = nn.ModuleList()
        c, s = in_channels, image_size
        for k in range(scales):
            c, s = c * 4, s // 2
            steps_k = nn.ModuleList()
            for _ in range(steps):
                steps_k.append(nn.ModuleList([ActNorm(c), InvConv(c), Coupling(c, hidden)]))
            out = c if k == scales - 1 else c // 2
            exit_norm = nn.ParameterList(
                [nn.Parameter(torch.zeros(out, s, s)), nn.Parameter(torch.zeros(out, s, s))]
            )
            self.scales.append(nn.ModuleList([steps_k, exit_norm]))
            c = c - out

    def forward(self, x):
        """Per-scale log p (nats), (N, L)."""
        lps = []
        half_log_2pi = 0.5 * math.log(2 * math.pi)
        for k, (steps, (loc, logs)) in enumerate(self.scales):
            x = squeeze(x)
            lp = x.new_zeros(x.shape[0])
            for norm, conv, coupling in steps:
                x, ld = norm(x)
                lp = lp + ld
                x, ld = conv(x)
                lp = lp + ld
                x, ld = coupling(x)
                lp = lp + ld
            out = loc.shape[0]
            z, x = x[:, :out], x[:, out:]
            y = (z + loc) * (logs.exp() + 1e-8)
            lp = lp + (logs.exp() + 1e-8).log().sum()
            lp = lp - (0.5 * y * y + half_log_2pi).flatten(1).sum(1)
            lps.append(lp)
        return torch.stack(lps, 1)


def torch_ips(cfg, batch, mode, runs, warmup=2, min_s=2.0):
    torch.manual_seed(0)
    model = Glow(**cfg)
    x = torch.rand(batch, cfg["in_channels"], cfg["image_size"], cfg["image_size"]) - 0.5

    opt = torch.optim.Adamax(model.parameters(), lr=5e-4, weight_decay=5e-5)
    xg = torch.rand_like(x) - 0.5
    general = Glow(**cfg) if mode == "train-step-outlier" else None
    to_bpd = 1.0 / (cfg["in_channels"] * cfg["image_size"] ** 2 * math.log(2))
    w, t = 300.0, 300.0  # glowwatch's OutlierLoss::grey_default

    def step():
        if mode == "score":
            with torch.inference_mode():
                model(x)
            return
        opt.zero_grad(set_to_none=True)
        loss = -model(x).sum(1).mean() * to_bpd
        if general is not None:
            with torch.no_grad():
                lp_gen = general(xg).sum(1)
            delta = (model(xg).sum(1) - lp_gen) / t
            loss = loss + F.softplus(delta).mean() * (w * to_bpd)
        loss.backward()
        opt.step()

    for _ in range(warmup):
        step()
    rates = []
    for _ in range(runs):
        t0, n = time.perf_counter(), 0
        while time.perf_counter() - t0 < min_s or n < 2:
            step()
            n += 1
        rates.append(n * batch / (time.perf_counter() - t0))
    return statistics.median(rates)


def glowwatch_ips(exe, name, batch, mode, runs):
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        subprocess.run(
            [exe, "bench", "--device", "cpu", "--config", name, "--batch", str(batch),
             "--mode", mode, "--runs", str(runs), "--json", f.name],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        rows = json.load(open(f.name))
    return rows[0]["images_per_s_median"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--glowwatch", default="target/release/glowwatch")
    ap.add_argument("--config", default="models/configs/grey32-l3-k4-w64.toml,models/configs/grey32-l3-k8-w128.toml,small3")
    ap.add_argument("--batch", default="64")
    ap.add_argument("--mode", default="score,train-step,train-step-outlier")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--runs", type=int, default=3)
    a = ap.parse_args()
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} CPUs; glowwatch {a.glowwatch}", flush=True)
    head = f"{'config':<40} {'mode':<18} {'batch':>5} {'glowwatch img/s':>16} {'torch img/s':>12} {'ratio':>6}"
    print(head)
    print("-" * len(head), flush=True)
    for name in a.config.split(","):
        cfg = config(name)
        for mode in a.mode.split(","):
            for batch in map(int, a.batch.split(",")):
                ours, theirs = [], []
                for _ in range(a.rounds):
                    ours.append(glowwatch_ips(a.glowwatch, name, batch, mode, a.runs))
                    theirs.append(torch_ips(cfg, batch, mode, a.runs))
                o, t = statistics.median(ours), statistics.median(theirs)
                label = os.path.basename(name)
                print(f"{label:<40} {mode:<18} {batch:>5} {o:>16.1f} {t:>12.1f} {o / t:>6.2f}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
