"""Distillation, int8 quantization and pruning on real MedMNIST data, through `medexp train` and
`medexp compress`, as a user would run them.

    python scripts/benchmark_compression.py --data-root ../shared/data/medmnist --name breastmnist

1. teacher: ``model=resnet18`` (MONAI ResNet-18, the MedMNIST v2 28-pixel variant)
2. student alone: the student's net (SimpleCNN, channels 8-16-32, as in ``model=distill``)
   trained on the labels only (``model=cnn`` with the same net): the baseline distillation must beat
3. student distilled: ``model=distill model.teacher_ckpt=<teacher>`` (KD at ``--temperature``,
   ``--alpha``; ``--feature-weight`` > 0 adds feature matching)
4. ``medexp compress`` of the teacher (``static``, ``dynamic``) and of the distilled student
   (``static``, and ``prune`` at ``--amounts``): every model an ONNX file (int8: quantized by ONNX
   Runtime, ``--quant-format``, ``--per-channel``), timed with onnxruntime on the CPU with
   ``--threads`` intra-op threads

Every run goes into ``--log-dir`` (a run whose ``metrics.json`` or ONNX ``compression.json`` exists
is reused); each result becomes a JSON line in ``--jsonl`` and a row of the Markdown tables printed
at the end. Epochs default to a short run (minutes on 2 CPU cores); the MedMNIST protocol is 100.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent / "bench"))
from common import machine, medexp, run  # noqa: E402  (scripts/bench/common.py)

QUIET = ["callbacks.rich_progress_bar=null", "callbacks.rich_model_summary=null", "trainer.enable_progress_bar=false"]
STUDENT_NET = ["model.net.channels=[8,16,32]", "model.net.dropout=0.0"]


def train(args: argparse.Namespace, name: str, overrides: list[str]) -> dict[str, Any]:
    """``medexp train`` into ``<log-dir>/<name>`` (reused when done); its metrics and parameters."""
    run_dir = Path(args.log_dir) / name
    wall = 0.0
    if not (run_dir / "metrics.json").exists():
        wall = run(
            medexp(
                "train",
                *args.data,
                *overrides,
                f"hydra.run.dir={run_dir.resolve()}",
                f"seed={args.seed}",
                "report=false",
                *QUIET,
            ),
            threads=args.threads,
        )
    metrics = json.loads((run_dir / "metrics.json").read_text())
    ckpt = Path(metrics["best_checkpoint"])
    return {
        "stage": "train",
        "run": name,
        "checkpoint": str(ckpt),
        "wall_s": wall,
        "parameters": parameters(ckpt),
        "test_accuracy": metrics["test"]["test/accuracy"],
        "test_auroc": metrics["test"]["test/auroc"],
    }


def parameters(ckpt: Path) -> int:
    """The trainable parameters of the net in a medexp checkpoint."""
    from medexp.checkpoints.checkpoint import INFERENCE, Checkpoint

    # a student rebuilt for counting: its teacher is loaded only when training starts
    return sum(p.numel() for p in Checkpoint(ckpt).build_model(INFERENCE).net.parameters())


def compress(args: argparse.Namespace, source: dict[str, Any], method: str) -> list[dict[str, Any]]:
    """``medexp compress`` of ``source``'s checkpoint; one row per model of its compression.json."""
    out = Path(args.log_dir) / f"compress_{source['run']}_{method}"
    if not onnx_report(out / "compression.json"):
        amounts = [f"amount=[{','.join(str(a) for a in args.amounts)}]"] if method == "prune" else []
        run(
            medexp(
                "compress",
                f"ckpt_path={source['checkpoint']}",
                f"method={method}",
                *amounts,
                f"output={out.resolve()}",
                f"hydra.run.dir={(out / 'run').resolve()}",
                f"latency.repeats={args.repeats}",
                f"latency.threads={args.threads}",
                f"quant_format={args.quant_format}",
                f"per_channel={str(args.per_channel).lower()}",
            ),
            threads=args.threads,
        )
    report = json.loads((out / "compression.json").read_text())
    return [
        {
            "stage": "compress",
            "source": source["run"],
            "method": method,
            "model": row["model"],
            **{
                key: row[key]
                for key in (
                    "accuracy",
                    "auroc",
                    "agreement",
                    "latency_ms",
                    "weight_bytes",
                    "gzip_bytes",
                    "weight_sparsity",
                )
            },
            "notes": report["notes"],
        }
        for row in report["rows"]
    ]


def onnx_report(path: Path) -> bool:
    """True where ``path`` is a compression.json of the ONNX Runtime implementation (rows with
    ``weight_bytes``); one of the former torch.ao/TorchScript one is redone, not reused."""
    return path.exists() and "weight_bytes" in json.loads(path.read_text())["rows"][0]


def tables(trained: list[dict[str, Any]], compressed: list[dict[str, Any]]) -> str:
    lines = [
        "| model | parameters | test AUROC | test ACC | train wall time |",
        "|---|---|---|---|---|",
        *(
            f"| {r['run']} | {r['parameters']:,} | {r['test_auroc']:.3f} | {r['test_accuracy']:.3f} | "
            f"{r['wall_s'] / 60:.1f} min |"
            for r in trained
        ),
        "",
        "| source | method | model | test AUROC | test ACC | agreement with float32 | CPU ms/image | weights KiB | gzip KiB | sparsity |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in compressed:
        if r["model"] == "float32" and r["method"] != "static":
            continue  # the float32 row of every report of the same source: shown once
        sparsity = "" if r["weight_sparsity"] is None else f"{r['weight_sparsity']:.2f}"
        lines.append(
            f"| {r['source']} | {r['method']} | {r['model']} | {r['auroc']:.3f} | {r['accuracy']:.3f} | "
            f"{r['agreement']:.3f} | {r['latency_ms']:.3f} | {r['weight_bytes'] / 1024:.1f} | "
            f"{r['gzip_bytes'] / 1024:.1f} | {sparsity} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--name", default="breastmnist", help="a 2D MedMNIST set in --data-root")
    parser.add_argument("--log-dir", default="logs/benchmark_compression")
    parser.add_argument("--jsonl", default="logs/benchmark_compression/results.jsonl")
    parser.add_argument("--teacher-epochs", type=int, default=10)
    parser.add_argument("--student-epochs", type=int, default=20)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--temperature", type=float, default=4.0)
    parser.add_argument("--feature-weight", type=float, default=0.0)
    parser.add_argument("--amounts", nargs="+", type=float, default=[0.2, 0.5, 0.8])
    parser.add_argument("--repeats", type=int, default=50, help="timed passes per model (latency: their median)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads of training and of the latency")
    parser.add_argument("--quant-format", choices=["qdq", "qoperator"], default="qdq", help="static int8's ONNX form")
    parser.add_argument(
        "--per-channel", action=argparse.BooleanOptionalAction, default=True, help="int8 scales per output channel"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not Path(args.data_root).is_dir():
        raise SystemExit(f"--data-root {args.data_root}: no such folder")
    args.data = ["data=medmnist", f"data.name={args.name}", f"data.root={Path(args.data_root).resolve()}"]
    start = time.perf_counter()

    teacher = train(args, "teacher_resnet18", ["model=resnet18", f"trainer.max_epochs={args.teacher_epochs}"])
    alone = train(args, "student_alone", ["model=cnn", *STUDENT_NET, f"trainer.max_epochs={args.student_epochs}"])
    distilled = train(
        args,
        "student_distilled",
        [
            "model=distill",
            f"model.teacher_ckpt={teacher['checkpoint']}",
            f"model.alpha={args.alpha}",
            f"model.kd_temperature={args.temperature}",
            f"model.feature_weight={args.feature_weight}",
            f"trainer.max_epochs={args.student_epochs}",
        ],
    )
    trained = [teacher, alone, distilled]
    compressed = [
        *compress(args, teacher, "static"),
        *compress(args, teacher, "dynamic"),
        *compress(args, distilled, "static"),
        *compress(args, distilled, "prune"),
    ]
    record = {
        "machine": machine(),
        "data": args.name,
        "args": {k: v for k, v in vars(args).items() if k != "data"},
        "trained": trained,
        "compressed": compressed,
        "wall_s": time.perf_counter() - start,
    }
    path = Path(args.jsonl)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as file:
        file.write(json.dumps(record) + "\n")
    print(tables(trained, compressed))
    for note in sorted({note for row in compressed for note in row["notes"]}):
        print(f"- {note}")


if __name__ == "__main__":
    main()
