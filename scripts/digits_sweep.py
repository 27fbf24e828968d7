"""Learning curves on the embedded digits: accuracy and Frechet distance vs images and seconds.

Each variant is `configs/quickstart.py` with a few fields changed (or the reference UNet of
`scripts/reference_unet.py` in place of the backbone). It trains with the library's own train
state, optimizer and jitted train step on the 5000 digits held in memory, preprocessed exactly as
the input pipeline does it, and at each `--eval_at` point (images seen) draws 20 samples per
class and scores them with the project's digits classifier (`evaluation.digits_quality`). Every
row records the images seen, the training seconds (wall-clock and CPU, compilation and sampling
excluded) and the 1-minute load average, so a table says how busy the machine was.

    python scripts/digits_sweep.py --variants=quickstart,dit --eval_at=10000,20000,40000
    python scripts/digits_sweep.py --variants=quickstart --eval_at=30000 \
        --samplers=default,ddpm:250:1.0:raw,ddim:50:3.0:raw,dpm++2m:25:1.5:ema

`--samplers` adds sampling settings evaluated on the same weights: `default` is the config's
(sampler, steps, guidance scale, EMA weights, clipping automatic for pixels); the others are
`sampler:steps:cfg_scale:ema|raw[:clip|noclip]`; with `--compare_at` they all run only at those
points and the first elsewhere. Rows go to `<out>/rows.jsonl` as they come and a
markdown table to stdout; the sample grid of each row to `<out>/<variant>_<images>_<setting>.png`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


@dataclasses.dataclass(frozen=True)
class Variant:
    """A quickstart config change: `config_arg` of configs/quickstart.py and dotted overrides."""

    description: str
    overrides: dict = dataclasses.field(default_factory=dict)
    config_arg: str | None = None
    unet: bool = False  # scripts/reference_unet.py instead of the config's backbone


# The recipe before docs/quickstart.md's diagnosis, at the new default's size and batch: DiT's
# conditioning init, no positions, no x_0 clipping, EMA without warmup, learned variance with
# the hybrid loss, the linear schedule, eps prediction.
_OLD = {
    "diffusion.schedule": "linear",
    "diffusion.prediction": "eps",
    "model.label_init_std": 0.02,
    "model.pos_embed": "none",
    "sampling.clip_denoised": False,
    "ema_warmup": False,
    "model.learn_sigma": True,
    "diffusion.loss": "hybrid",
}

VARIANTS = {
    "quickstart": Variant("the quickstart default"),
    "old": Variant("DiffuSSM, old recipe", _OLD),
    "label": Variant("old + label table at unit scale", {**_OLD, "model.label_init_std": 1.0}),
    "label_pos": Variant(
        "old + unit label table + sin-cos positions",
        {**_OLD, "model.label_init_std": 1.0, "model.pos_embed": "sincos"},
    ),
    "label_002": Variant("quickstart, DiT's label init (0.02)", {"model.label_init_std": 0.02}),
    "no_pos": Variant("quickstart without positions", {"model.pos_embed": "none"}),
    "learned_pos": Variant("quickstart, learned positions", {"model.pos_embed": "learned"}),
    "ema_no_warmup": Variant("quickstart, EMA 0.995 without warmup", {"ema_warmup": False}),
    "t_unit": Variant("quickstart + t-MLP init 0.1", {"model.timestep_init_std": 0.1}),
    "cosine": Variant("quickstart, cosine schedule", {"diffusion.schedule": "cosine"}),
    "hybrid": Variant(
        "quickstart, learned sigma + hybrid loss",
        {"model.learn_sigma": True, "diffusion.loss": "hybrid"},
    ),
    "eps": Variant("quickstart, eps prediction (DiT's)", {"diffusion.prediction": "eps"}),
    "v": Variant("quickstart, v prediction (the default)", {"diffusion.prediction": "v"}),
    "min_snr": Variant(
        "quickstart, eps prediction + min-SNR-5",
        {"diffusion.prediction": "eps", "diffusion.loss_weighting": "min_snr"},
    ),
    "v_min_snr": Variant(
        "quickstart, v prediction + min-SNR-5",
        {"diffusion.prediction": "v", "diffusion.loss_weighting": "min_snr"},
    ),
    "flow": Variant(
        "quickstart, flow matching (logit-normal t), Heun 25",
        {
            "diffusion.process": "flow",
            "diffusion.prediction": "eps",  # the flow's network predicts eps - x_0
            "diffusion.t_sampling": "logit_normal",
            "sampling.sampler": "heun",
            "sampling.steps": 25,
        },
    ),
    "d128": Variant("quickstart at width 128", {"model.hidden_size": 128}),
    "dit": Variant("DiT, 2x2 patches (64 tokens), quickstart recipe", config_arg="model=DiT-S/2"),
    "dit_d128": Variant(
        "DiT, 2x2 patches, width 128: about the quickstart's cost per image",
        {"model.hidden_size": 128},
        config_arg="model=DiT-S/2",
    ),
    "dit_old": Variant(
        "DiT, 2x2 patches, old recipe",
        {k: v for k, v in _OLD.items() if "pos_embed" not in k},
        config_arg="model=DiT-S/2",
    ),
    "dit_label_002": Variant(
        "DiT, 2x2 patches, DiT's label init (0.02)",
        {"model.label_init_std": 0.02},
        config_arg="model=DiT-S/2",
    ),
    "unet": Variant("reference UNet, quickstart recipe", unet=True),
    "unet_old": Variant(
        "reference UNet, DiT's label init", {"model.label_init_std": 0.02}, unet=True
    ),
}

flags.DEFINE_list("variants", ["quickstart"], f"Variants to train, of {sorted(VARIANTS)}.")
flags.DEFINE_list("eval_at", ["10000", "20000", "30000"], "Images seen at which to sample.")
flags.DEFINE_list("samplers", ["default"], "Sampling settings per evaluation (module doc).")
flags.DEFINE_list(
    "compare_at", [], "Images seen at which every --samplers setting runs (elsewhere the first)."
)
flags.DEFINE_integer("per_class", 20, "Samples per class at each evaluation.")
flags.DEFINE_integer("seed", 0, "Seed of the config (init, noise, data order).")
flags.DEFINE_list("set", [], "Extra dotted overrides for every variant, e.g. global_batch_size=32.")
flags.DEFINE_string("out", "runs/digits_sweep", "Directory for rows.jsonl and sample grids.")
FLAGS = flags.FLAGS


def build_config(variant: Variant, extra: dict):
    from configs import quickstart

    config = quickstart.get_config(variant.config_arg)
    with config.unlocked():
        config.seed = FLAGS.seed
        config.update_from_flattened_dict({**variant.overrides, **extra})
    return config


def sample_settings(config, names: list[str]) -> list[dict]:
    from diffussm_jax import training

    settings = []
    for name in names:
        if name == "default":
            setting = dict(
                sampler=config.sampling.sampler,
                steps=config.sampling.steps,
                cfg_scale=config.sampling.cfg_scale,
                weights="ema",
                clip=training.clip_denoised_for(config),
            )
        else:
            sampler, steps, cfg_scale, weights, *clip = name.split(":")
            setting = dict(
                sampler=sampler,
                steps=int(steps),
                cfg_scale=float(cfg_scale),
                weights=weights,
                clip=(clip[0] == "clip") if clip else training.clip_denoised_for(config),
            )
        setting["name"] = (
            f"{setting['sampler']}{setting['steps']} g{setting['cfg_scale']} {setting['weights']}"
            + ("" if setting["clip"] else " noclip")
        )
        settings.append(setting)
    return settings


def train_variant(name: str, extra: dict, eval_at: list[int], writer) -> list[dict]:
    import jax
    import jax.numpy as jnp
    from digits_in_memory import digits_for

    from diffussm_jax import evaluation, parallel, sampling, training

    variant = VARIANTS[name]
    config = build_config(variant, extra)
    mesh = parallel.create_mesh(config.mesh.data, config.mesh.fsdp)
    if variant.unet:
        from reference_unet import ReferenceUNet

        model = ReferenceUNet(
            config.data.image_size,
            config.data.channels,
            config.data.num_classes,
            learn_sigma=config.model.learn_sigma,
            label_init_std=config.model.label_init_std,
        )
    else:
        model = None
    experiment = training.setup(config, mesh, model)
    model, diffusion, state = experiment.model, experiment.diffusion, experiment.init_state()
    num_params = sum(x.size for x in jax.tree.leaves(state.params))
    step_fn = experiment.train_step()
    settings = sample_settings(config, FLAGS.samplers)
    sample_fns = {}
    images, labels = digits_for(config)
    batch_size = config.global_batch_size
    order_rng = np.random.default_rng(config.seed)
    order = np.empty(0, np.int64)
    requested = np.repeat(np.arange(config.data.num_classes, dtype=np.int32), FLAGS.per_class)
    eval_steps = {-(-count // batch_size): count for count in eval_at}
    rows = []
    # Training time = time in the loop minus sampling, counted from the end of the first
    # (compiling) step; steps are asynchronous, so the clock is read after a blocking step.
    paused_wall = paused_cpu = 0.0
    start = time.perf_counter()
    for step in range(1, max(eval_steps) + 1):
        if len(order) < batch_size:
            order = np.concatenate([order, order_rng.permutation(len(images))])
        index, order = order[:batch_size], order[batch_size:]
        batch = jax.device_put(
            {"image": jnp.asarray(images[index]), "label": jnp.asarray(labels[index])},
            parallel.batch_sharding(mesh),
        )
        state, step_metrics = step_fn(state, batch)
        if step == 1 or step in eval_steps:
            jax.block_until_ready(step_metrics)
        if step == 1:
            print(
                f"{name}: {num_params / 1e6:.3f}M parameters, compile + first step "
                f"{time.perf_counter() - start:.1f} s",
                flush=True,
            )
            clock_wall, clock_cpu = time.perf_counter(), time.process_time()
            continue
        if step not in eval_steps:
            continue
        wall = time.perf_counter() - clock_wall - paused_wall
        cpu = time.process_time() - clock_cpu - paused_cpu
        pause_wall, pause_cpu = time.perf_counter(), time.process_time()
        compare = not FLAGS.compare_at or eval_steps[step] in {int(n) for n in FLAGS.compare_at}
        for setting in settings if compare else settings[:1]:
            key = tuple(setting[k] for k in ("sampler", "steps", "cfg_scale", "clip"))
            if key not in sample_fns:
                sample_fns[key] = sampling.make_sample_fn(
                    model,
                    diffusion,
                    mesh,
                    sampler=setting["sampler"],
                    steps=setting["steps"],
                    cfg_scale=setting["cfg_scale"],
                    clip_denoised=setting["clip"],
                )
            params = state.ema_params if setting["weights"] == "ema" else state.params
            samples = sampling.draw(sample_fns[key], params, jax.random.key(step), requested, mesh)
            quality = evaluation.digits_quality(samples, requested)
            row = dict(
                variant=name,
                description=variant.description,
                images=step * batch_size,
                steps=step,
                train_wall_s=round(wall, 1),
                train_cpu_s=round(cpu, 1),
                images_per_s=round((step - 1) * batch_size / wall, 1),
                load_1min=round(os.getloadavg()[0], 2),
                mse=round(float(step_metrics["mse"]), 4),
                setting=setting["name"],
                accuracy=quality["accuracy"],
                frechet=round(quality["frechet_distance"], 1),
                real_frechet=round(quality["held_out_frechet_distance"], 1),
                real_accuracy=quality["held_out_accuracy"],
                params_m=round(num_params / 1e6, 3),
            )
            rows.append(row)
            writer(row)
            grid = sampling.image_grid(
                evaluation.to_uint8(samples[:: FLAGS.per_class // 10 or 1][:100]), 10
            )
            slug = setting["name"].replace(" ", "_")
            sampling.save_png(os.path.join(FLAGS.out, f"{name}_{row['images']}_{slug}.png"), grid)
        paused_wall += time.perf_counter() - pause_wall
        paused_cpu += time.process_time() - pause_cpu
    return rows


def markdown(rows: list[dict]) -> str:
    lines = [
        "| variant | what changed | images seen | train s (wall) | img/s | load | sampling "
        "| accuracy | Frechet |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['description']} | {r['images']:,} | {r['train_wall_s']:.0f} "
            f"| {r['images_per_s']:.0f} | {r['load_1min']:.1f} | {r['setting']} "
            f"| {r['accuracy']:.1%} | {r['frechet']:.1f} |"
        )
    return "\n".join(lines)


def main(argv):
    del argv
    sys.path.insert(0, os.path.dirname(__file__))
    os.makedirs(FLAGS.out, exist_ok=True)
    from configs import base

    extra = base.parse_overrides(FLAGS.set)
    log_path = os.path.join(FLAGS.out, "rows.jsonl")
    command = " ".join(["python", "scripts/digits_sweep.py", *sys.argv[1:]])

    def write(row):
        print(json.dumps(row), flush=True)
        with open(log_path, "a", encoding="utf-8") as f:
            f.write(json.dumps({**row, "command": command}) + "\n")

    eval_at = sorted(int(count) for count in FLAGS.eval_at)
    rows = []
    for name in FLAGS.variants:
        if name not in VARIANTS:
            raise app.UsageError(f"unknown variant {name!r}; choose from {sorted(VARIANTS)}.")
    for name in FLAGS.variants:
        rows += train_variant(name, extra, eval_at, write)
    print(f"\n{command}\n")
    print(markdown(rows))


if __name__ == "__main__":
    app.run(main)
