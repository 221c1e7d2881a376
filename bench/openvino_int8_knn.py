"""What OpenVINO int8 costs in accuracy: k-NN top-1 on the demo data of the int8 IR vs the fp32 IR vs PyTorch fp32.

    python bench/openvino_int8_knn.py mff_vit_small.demo            # a trained model (default: the demo tag)

Exports the model twice through `mffzoo export` (format openvino, fp32 and int8: the same pipeline, gates and
sidecars as the CLI), runs PyTorch fp32 and both IRs over the demo data's train and val splits with the model's
eval preprocessing, and scores the pooled embeddings with the project's k-NN (mffzoo.eval.knn: k=20, cosine,
T=0.07). int8 is calibrated on the *train* split here (--calib-images), so no val image is seen before scoring.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from mffzoo.data.demo import default_demo_root, write_demo_dataset
from mffzoo.eval.data import eval_transform, make_loader, open_splits
from mffzoo.eval.knn import knn_accuracy
from mffzoo.export import ExportModule, export_model
from mffzoo.export.api import load_export_model
from mffzoo.export.openvino import OvRunner
from mffzoo.export.profile import ExportProfile


def _features(run, loader) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: ANN001
    feats, labels = [], []
    for x, y in loader:
        feats.append(torch.from_numpy(np.asarray(run(x.numpy()), dtype=np.float32)))
        labels.append(torch.as_tensor(y).long())
    return torch.cat(feats), torch.cat(labels)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default="mff_vit_small.demo")
    ap.add_argument("--data", default=None, help="ImageFolder root with train/ and val/ (default: the demo data)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    data = Path(args.data) if args.data else write_demo_dataset(default_demo_root())
    fp32 = load_export_model(ExportProfile(model=args.model))
    train_ds, val_ds = open_splits(data, eval_transform(fp32), eval_transform(fp32))
    loaders = [make_loader(ds, args.batch) for ds in (train_ds, val_ds)]
    torch_ref = ExportModule(fp32, "pooled")

    @torch.no_grad()
    def torch_run(x: np.ndarray) -> np.ndarray:
        return torch_ref(torch.from_numpy(x)).numpy()

    rows = {}
    with tempfile.TemporaryDirectory(prefix="ov-knn-") as tmp:
        runners = {"torch fp32": torch_run}
        for p in ("fp32", "int8"):
            res = export_model(args.model, format="openvino", precision=p, features="pooled",
                               output=Path(tmp) / f"m-{p}.xml", batch={"min": 1, "opt": args.batch, "max": args.batch},
                               quantize={"calibration_images": str(data / "train")} if p == "int8" else None)
            runners[f"openvino {p}"] = OvRunner(res.artefact, p)
            print(f"{p}: parity {'passed' if res.report.passed else 'FAILED'} "
                  f"(cosine {min(r.metrics.cosine for r in res.report.rows if r.inputs == 'all'):.5f})", flush=True)
        for name, run in runners.items():
            t = time.perf_counter()
            (tr, ytr), (va, yva) = (_features(run, ld) for ld in loaders)
            acc = knn_accuracy(tr, ytr, va, yva, len(train_ds.classes))
            rows[name] = {**acc, "seconds": round(time.perf_counter() - t, 1)}
            print(f"{name:15s} k-NN top-1 {acc['top1']:.2f}  top-5 {acc['top5']:.2f}", flush=True)
    out = {"model": args.model, "data": str(data), "train": len(train_ds), "val": len(val_ds),
           "knn": {"k": 20, "temperature": 0.07, "features": "pooled (cls token + final norm)"},
           "int8_calibration": f"{data / 'train'} (64 images)", "results": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    drop = rows["openvino fp32"]["top1"] - rows["openvino int8"]["top1"]
    print(f"int8 vs fp32 IR: {drop:+.2f} points top-1 lost ({len(val_ds)} val images, {len(train_ds)} train)")


if __name__ == "__main__":
    main()
