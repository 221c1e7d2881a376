"""``mffzoo bench``: speed measurements that print a ratio against a named peer measured in the same run.

A click group: each benchmark is one sub-command (``infer`` here; others register with one
``bench.add_command`` line).
"""

from __future__ import annotations

from pathlib import Path

import click

from .options import BATCH, FEATURES, IMG_SIZE, LEVELS, MODEL, OUT_PATH, FiniteFloat, count


@click.group("bench")
def bench() -> None:
    """Benchmarks (each prints a ratio against its peer, measured in the same process)."""


@bench.command("infer")
@click.argument("model", type=MODEL, required=False)
@click.option("--random-init", is_flag=True, help="Random weights (fine for speed; parity is still measured).")
@click.option("--batch", type=BATCH, default=8, show_default=True, help="Batch size of the throughput measurement.")
@click.option("--backends", default=None,
              help="Comma-separated backends (default: all available here). See `--list`.")
@click.option("--list", "list_backends", is_flag=True, help="List the backends and whether they run here.")
@click.option("--rounds", type=count(1), default=3, show_default=True,
              help="Interleaved rounds (spread = min..max over rounds).")
@click.option("--iters", type=count(1), default=10, show_default=True,
              help="Timed calls per backend per round and measurement.")
@click.option("--threads", type=count(1), default=None, help="CPU threads for torch and ONNX Runtime (default: all).")
@click.option("--img-size", type=IMG_SIZE, default=None)
@click.option("--json", "json_path", type=OUT_PATH, default=None, help="Write the results here.")
@click.option("--features", type=FEATURES, default="auto", show_default=True,
              help="What the artefacts output, as `mffzoo export --features` (levels: the dense-task maps).")
@click.option("--levels", type=LEVELS, default=None, help="With --features levels: 0-based encoder blocks.")
def infer(model: str | None, random_init: bool, batch: int, backends: str | None, list_backends: bool, rounds: int,
          iters: int, threads: int | None, img_size: int | None, json_path: Path | None, features: str,
          levels: list[int] | None) -> None:
    """Inference latency (batch 1, p50/p90) and throughput (--batch) of MODEL on every backend, vs eager fp32."""
    from ..bench import infer as infer_bench
    from ..cpu import cpu_features
    from .zoo import print_table

    if list_backends:
        avail = infer_bench.available_backends()
        print_table([[b.name, b.device, b.precision, "yes" if avail[b.name] is None else f"no: {avail[b.name]}",
                      b.description] for b in infer_bench.backends().values()],
                    ["backend", "device", "precision", "here", "what"])
        cpu = cpu_features()
        click.echo(f"\nthis CPU: {cpu.model} ({cpu.describe()})")
        return
    if not model:
        from ..errors import ConfigError

        raise ConfigError("missing argument MODEL: pass a model name, folder or checkpoint (only --list needs none)")
    result = infer_bench.run_infer_bench(
        model, random_init=random_init, batch=batch,
        backends=[b.strip() for b in backends.split(",") if b.strip()] if backends else None,
        rounds=rounds, iters=iters, threads=threads, img_size=img_size, json_path=json_path, features=features,
        levels=levels,
    )
    rows, header = result.table()
    print_table(rows, header)
    for line in result.notes():
        click.echo(line)
    if json_path:
        click.echo(f"wrote {json_path}")


@bench.command("train")
@click.option("--recipe", default=None, metavar="RECIPE",
              help="Bench what this recipe's run does here (a file or a bare name like vits): its model, "
                   "train.batch_per_device, precision, attention, optimizer and train.compile, compilation "
                   "included (its time reported apart). Not with --models.")
@click.option("--models", default=None, help="Comma-separated sizes s, b, l with the recipe defaults "
              "[default: s,b].")
@click.option("--impls", default=None,
              help="Comma-separated mffzoo rows: mffzoo (eager), mffzoo-compile (torch.compile, as "
                   "train.compile does), mffzoo-mae, mffzoo-sdpa (train.attention=sdpa) [default: mffzoo,"
                   "mffzoo-mae; with --recipe: mffzoo, plus mffzoo-compile when the recipe compiles].")
@click.option("--peers", default="auto", show_default=True,
              help="Comma-separated HF ViTMAEForPreTraining rows: auto (the peer under each mffzoo row's "
                   "precision: hf-bf16 where bf16 runs, hf where it falls back to fp32), hf (its fp32 default), "
                   "hf-bf16, hf-fp16; e.g. auto,hf adds the fp32 default for reference.")
@click.option("--batch-size", type=BATCH, default=None, help="Per step, same for every implementation "
              "(default: the recipe's train.batch_per_device; per size: s 16, b 8, l 4 on a CPU; s 256, b 128, "
              "l 64 on a GPU).")
@click.option("--steps", type=count(1), default=5, show_default=True, help="Timed steps (img/s uses their median).")
@click.option("--warmup", type=count(0), default=2, show_default=True,
              help="Untimed steps first (a compiled row compiles in them).")
@click.option("--repeats", type=count(1), default=1, show_default=True,
              help="Runs, each in a fresh process (the spread).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default=None,
              help="[default: auto, or the recipe's train.device]")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="With --recipe: any recipe key, as for mffzoo train (e.g. --set train.batch_per_device=16); "
                   "else a model override (recipe model.* key), e.g. --set depth=4.")
@click.option("--no-memory", is_flag=True, help="Skip the peak-memory runs (one fresh process per row).")
@click.option("--markdown", is_flag=True, help="Print a Markdown table (for docs/benchmarks.md).")
@click.option("--json", "json_path", type=OUT_PATH, default=None, help="Write the rows here.")
def train(recipe: str | None, models: str | None, impls: str | None, peers: str, batch_size: int | None, steps: int,
          warmup: int, repeats: int, device: str | None, overrides: tuple[str, ...], no_memory: bool, markdown: bool,
          json_path: Path | None) -> None:
    """Pretraining step throughput and peak memory, mffzoo vs HF ViTMAEForPreTraining under the same precision
    (ratios in the same run, also to the fastest peer row)."""
    import json

    from ..bench.train import bench_train
    from .zoo import print_table

    result = bench_train(
        None if models is None else models.split(","), recipe=recipe,
        impls=None if impls is None else impls.split(","), peers=peers.split(","), batch_size=batch_size,
        steps=steps, warmup=warmup, repeats=repeats, device=device, overrides=overrides, memory=not no_memory,
        log=lambda s: click.echo(s, err=True),
    )
    header, body = result.table()
    if markdown:  # for docs/benchmarks.md
        click.echo("| " + " | ".join(header) + " |")
        click.echo("|" + "|".join("---" for _ in header) + "|")
        for line in body:
            click.echo("| " + " | ".join(line) + " |")
    else:
        print_table(body, header)
    click.echo("")
    for line in result.notes():  # the fastest-peer summary, the like-for-like parameter check, the machine
        click.echo(line)
    if json_path:
        json_path.write_text(json.dumps(result.to_dicts(), indent=1))
        click.echo(f"wrote {json_path}")


@bench.command("data")
@click.argument("recipe")
@click.option("--data", "data", default=None, help="Measure this ImageNet-style folder instead of generated "
              "500x375 JPEGs.")
@click.option("--images", type=count(2), default=256, show_default=True,
              help="Images per round (generated ones are cached).")
@click.option("--rounds", type=count(1), default=3, show_default=True,
              help="Interleaved rounds (spread = min..max over rounds).")
@click.option("--workers", type=count(0), default=2, show_default=True,
              help="Also measure a DataLoader with this many workers (0: only the 1-worker, in-process measurement).")
@click.option("--batch", type=BATCH, default=None, help="Collate batch (default: train.batch_per_device, at most 32).")
@click.option("--target-img-s", type=FiniteFloat(min=0, min_open=True), default=None,
              help="Training img/s per process to feed: prints the workers it needs.")
@click.option("--steps-per-s", type=FiniteFloat(min=0, min_open=True), default=None,
              help="Or a measured/quoted step rate (steps/s per "
              "process); the target is this x train.batch_per_device.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Recipe override, e.g. "
              "--set data.augment=mae.")
@click.option("--json", "json_path", type=OUT_PATH, default=None, help="Write the results here.")
def data(recipe: str, data: str | None, images: int, rounds: int, workers: int, batch: int | None,
         target_img_s: float | None, steps_per_s: float | None, overrides: tuple[str, ...],
         json_path: Path | None) -> None:
    """Training loader img/s per worker (decode + augmentation + collate): data.fast_decode vs the plain path."""
    import json

    from ..bench.data import run_data_bench
    from .zoo import print_table

    result = run_data_bench(recipe, overrides, data=data, num_images=images, rounds=rounds, num_workers=workers,
                            batch=batch, target_img_s=target_img_s, steps_per_s=steps_per_s,
                            log=lambda s: click.echo(s, err=True))
    rows, header = result.table()
    print_table(rows, header)
    for line in result.notes():
        click.echo(line)
    if json_path:
        json_path.write_text(json.dumps(result.to_dict(), indent=1))
        click.echo(f"wrote {json_path}")
