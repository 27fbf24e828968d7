"""Our train steps against a PyTorch DiT on this CPU, timed side by side in one process.

    python scripts/cpu_peer_bench.py                      # batch 8, 32x32x4, float32, 2 minutes
    python scripts/cpu_peer_bench.py --rounds=7 --models=DiT-S/2,DiffuSSM-S

The peer is DiT-S/2 as the DiT paper and its reference code define it (12 blocks, width 384,
6 heads, patch 2, adaLN-Zero, tanh-GELU MLP of ratio 4, LayerNorm without affine parameters,
sin-cos positions, learned sigma), written here in PyTorch with fused SDPA attention (what timm's
Attention calls). Every model runs the same step: forward on random latents, MSE against a random
target over all output channels, backward, AdamW. The steps are timed in interleaved rounds so
that the machine's load falls on all of them alike; each round times `--calls` steps of each.

Dense FLOP/s counts 3 x the forward's matmul FLOPs (every dot_general of its jaxpr: the dense
layers and attention; for DiffuSSM also the small kernel-generation matmuls), the same count
for the peer as for our DiT-S/2: it compares how fast each model turns its matmul work into
progress, whatever else (FFTs, norms) it does. Needs the reference
extra (`pip install -e ".[reference]"`) for torch.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


# ----------------------------------------------------------------------------- PyTorch peer


def torch_dit(size: int, channels: int, width: int, depth: int, heads: int, patch: int):
    """A PyTorch DiT (learned sigma, 1000 classes + the null label)."""
    import torch
    from torch import nn
    from torch.nn import functional as F

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.modulation = nn.Linear(width, 6 * width)
            self.qkv = nn.Linear(width, 3 * width)
            self.proj = nn.Linear(width, width)
            self.fc1 = nn.Linear(width, 4 * width)
            self.fc2 = nn.Linear(4 * width, width)

        def forward(self, x, c):
            chunks = self.modulation(F.silu(c))[:, None].chunk(6, dim=-1)
            shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = chunks
            h = F.layer_norm(x, (width,), eps=1e-6) * (1 + scale_a) + shift_a
            batch, tokens, _ = h.shape
            q, k, v = self.qkv(h).view(batch, tokens, 3, heads, -1).permute(2, 0, 3, 1, 4)
            h = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(x.shape)
            x = x + gate_a * self.proj(h)
            h = F.layer_norm(x, (width,), eps=1e-6) * (1 + scale_m) + shift_m
            return x + gate_m * self.fc2(F.gelu(self.fc1(h), approximate="tanh"))

    class DiT(nn.Module):
        def __init__(self):
            super().__init__()
            grid = size // patch
            self.embed = nn.Conv2d(channels, width, patch, stride=patch)
            self.register_buffer("positions", _sincos(width, grid), persistent=False)
            self.t_mlp = nn.Sequential(nn.Linear(256, width), nn.SiLU(), nn.Linear(width, width))
            self.labels = nn.Embedding(1001, width)
            self.blocks = nn.ModuleList(Block() for _ in range(depth))
            self.final_modulation = nn.Linear(width, 2 * width)
            self.final = nn.Linear(width, patch * patch * 2 * channels)

        def forward(self, x, t, y):
            h = self.embed(x).flatten(2).transpose(1, 2) + self.positions
            half = 128
            freqs = torch.exp(-math.log(10_000) * torch.arange(half) / half)
            angles = t[:, None].float() * freqs[None]
            c = self.t_mlp(torch.cat([angles.cos(), angles.sin()], -1)) + self.labels(y)
            for block in self.blocks:
                h = block(h, c)
            shift, scale = self.final_modulation(F.silu(c))[:, None].chunk(2, dim=-1)
            h = self.final(F.layer_norm(h, (width,), eps=1e-6) * (1 + scale) + shift)
            grid, out = size // patch, 2 * channels
            h = h.view(-1, grid, grid, patch, patch, out).permute(0, 5, 1, 3, 2, 4)
            return h.reshape(-1, out, size, size)

    def _sincos(dim: int, grid: int):
        from diffussm_jax.models.layers import sincos_pos_embed_2d

        return torch.from_numpy(sincos_pos_embed_2d(dim, grid))[None]

    return DiT()


def torch_step(batch: int, size: int, channels: int, dims: dict):
    import torch

    torch.manual_seed(0)
    model = torch_dit(size, channels, **dims)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
    x = torch.randn(batch, channels, size, size)
    target = torch.randn(batch, 2 * channels, size, size)
    t = torch.randint(0, 1000, (batch,))
    y = torch.randint(0, 1000, (batch,))

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = torch.mean((model(x, t, y) - target) ** 2)
        loss.backward()
        optimizer.step()
        return loss.item()

    return step


# ----------------------------------------------------------------------------- our models


def jax_step(name: str, batch: int, size: int, channels: int, scan_layers: bool, **model_options):
    """One train step of our model `name`; `model_options` go to `models.create`."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import optax

    from diffussm_jax import models

    model = models.create(
        name,
        input_size=size,
        in_channels=channels,
        num_classes=1000,
        scan_layers=scan_layers,
        **model_options,
    )
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(batch, size, size, channels)), jnp.float32)
    target = jnp.asarray(rng.normal(size=(batch, size, size, 2 * channels)), jnp.float32)
    t = jnp.asarray(rng.integers(0, 1000, batch), jnp.int32)
    y = jnp.asarray(rng.integers(0, 1000, batch), jnp.int32)
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), x, t, y))["params"]
    tx = optax.adamw(1e-4, weight_decay=0.0)
    state = [params, tx.init(params)]

    @jax.jit
    def train(params, opt_state):
        def loss_fn(params):
            return jnp.mean((model.apply({"params": params}, x, t, y) - target) ** 2)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    def step():
        state[0], state[1], loss = train(*state)
        return float(loss)

    return step


def dense_gflop_per_step(name: str, batch: int, size: int, channels: int) -> float:
    """3 x the forward's dense FLOPs (every dot_general in its jaxpr) at this batch."""
    import jax

    from diffussm_jax import models
    from diffussm_jax.benchmarks import measure

    model = models.create(
        name, input_size=size, in_channels=channels, num_classes=1000, scan_layers=False
    )
    params = models.abstract_params(model)
    x, t, y = (
        jax.ShapeDtypeStruct((batch, *a.shape[1:]), a.dtype) for a in models.example_inputs(model)
    )
    forward = measure.dense_flops(lambda p, *a: model.apply({"params": p}, *a), params, x, t, y)
    return 3 * forward / 1e9


# ----------------------------------------------------------------------------- timing


def interleaved_times(steps: dict, rounds: int, calls: int) -> dict[str, list[float]]:
    """Seconds per step of each named step, from `rounds` rounds that each time `calls` steps
    of every one in turn (after two untimed warm-up steps each), so that the machine's load
    falls on all of them alike. Odd rounds go in reverse order, so that no step always runs
    first or last."""
    for step in steps.values():
        step()
        step()
    times = {name: [] for name in steps}
    for round_ in range(rounds):
        for name, step in list(steps.items())[:: -1 if round_ % 2 else 1]:
            start = time.perf_counter()
            for _ in range(calls):
                step()
            times[name].append((time.perf_counter() - start) / calls)
    return times


def print_ab_table(label: str, times: dict[str, list[float]]) -> None:
    print(f"| {label} | s/step (median) | range |\n|---|---|---|")
    for name, seconds in times.items():
        print(
            f"| {name} | {statistics.median(seconds):.3f} | {min(seconds):.3f}-{max(seconds):.3f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="DiT-S/2,DiffuSSM-S", help="our registry names")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=32, help="latent side")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=3, help="timed steps per model per round")
    parser.add_argument(
        "--scan_layers",
        action="store_true",
        help="nn.scan over our layers (off: unrolled, faster on XLA:CPU, as configs/quickstart.py)",
    )
    args = parser.parse_args()
    from diffussm_jax.parallel import host_allocator

    host_allocator.retain_freed_memory()  # both frameworks allocate with glibc's malloc
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    channels = 4
    steps = {
        "PyTorch DiT-S/2 (peer)": torch_step(
            args.batch, args.size, channels, dict(width=384, depth=12, heads=6, patch=2)
        )
    }
    gflop = {"PyTorch DiT-S/2 (peer)": dense_gflop_per_step("DiT-S/2", args.batch, args.size, 4)}
    for name in args.models.split(","):
        steps[name] = jax_step(name, args.batch, args.size, channels, args.scan_layers)
        gflop[name] = dense_gflop_per_step(name, args.batch, args.size, channels)
    times = interleaved_times(steps, args.rounds, args.calls)
    peer = "PyTorch DiT-S/2 (peer)"
    peer_rate = args.batch / statistics.median(times[peer])
    peer_flops = gflop[peer] / statistics.median(times[peer])
    print(
        f"Train step, batch {args.batch}, {args.size}x{args.size}x{channels} latents, float32, "
        f"AdamW + MSE; our layers {'scanned' if args.scan_layers else 'unrolled'}; "
        f"{args.rounds} interleaved rounds of {args.calls} steps; "
        f"torch {torch.__version__}, {os.cpu_count()} CPU cores, 1-min load at the end "
        f"{os.getloadavg()[0]:.2f}; host malloc: {host_allocator.describe()}\n"
    )
    print(
        "| model | s/step (median) | img/s (median) | img/s range | dense GFLOP/step "
        "| dense GFLOP/s | vs peer img/s | vs peer dense FLOP/s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, measured in times.items():
        rate = args.batch / statistics.median(measured)
        flops = gflop[name] / statistics.median(measured)
        low, high = args.batch / max(measured), args.batch / min(measured)
        print(
            f"| {name} | {statistics.median(measured):.3f} | {rate:.2f} | {low:.2f}-{high:.2f} | "
            f"{gflop[name]:.1f} | {flops:.1f} | {rate / peer_rate:.2f}x | "
            f"{flops / peer_flops:.0%} |"
        )


if __name__ == "__main__":
    main()
