"""The ``sam-demo`` entry point: an end-to-end tiny run, argument errors, label noise."""

from __future__ import annotations

import json
import math
import pickle
from pathlib import Path

import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

from python_api import demo  # noqa: E402


def _available(key: str) -> bool:
    return demo._optimizer_missing(demo.optimizer_registry()[key]) is None


def _tiny_optimizers() -> list[str]:
    """The base, SAM and (when its module exists) one adaptive method: AE-SAM."""
    keys = ["sgd", "sam"]
    if _available("aesam"):
        keys.append("aesam")
    return keys


def test_end_to_end_tiny_run(tmp_path, monkeypatch, capsys):
    """Runs main() with few steps and one seed; checks the table, JSON and plot it writes."""
    monkeypatch.chdir(tmp_path)  # no --out: the default folder goes under ./demo_out
    opts = _tiny_optimizers()
    rc = demo.main(
        [
            "--optimizers",
            ",".join(opts),
            "--seeds",
            "1",
            "--epochs",
            "2",
            "--max-steps",
            "30",
            "--batch-size",
            "64",
            "--noise",
            "0.3",
            "--rho",
            "sam=0.07",
            "--no-progress",
            "--device",
            "cpu",
        ]
    )
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "Traceback" not in err
    assert "| optimizer |" in out
    folders = list((tmp_path / "demo_out").iterdir())
    assert len(folders) == 1
    folder = folders[0]
    assert str(folder.resolve()) in out.splitlines()[-1]

    md = (folder / "results.md").read_text()
    assert "| optimizer |" in md and "SGD" in md and "SAM" in md
    png = (folder / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000

    report = json.loads((folder / "results.json").read_text())
    cfg = report["config"]
    assert cfg["data"] == "digits" and cfg["n_train"] == 1437 and cfg["n_test"] == 360
    assert cfg["noise"] == 0.3 and cfg["seeds"] == [0]
    assert cfg["optimizers"] == ["base" if k == "sgd" else k for k in opts]
    assert cfg["noisy_fraction"] == [pytest.approx(0.3, abs=1e-3)]
    rows = {r["optimizer"]: r for r in report["rows"]}
    assert list(rows) == cfg["optimizers"]
    for key, r in rows.items():
        assert {
            "label",
            "rho",
            "test_acc_mean",
            "test_acc_std",
            "train_loss_mean",
            "sam_steps_pct",
            "passes_per_step",
            "wall_s_mean",
            "fused_vs_eager",
            "curves",
        } <= set(r)
        assert 0.0 <= r["test_acc_mean"] <= 100.0
        assert r["test_acc_mean"] > 25.0, f"{key} did not learn at all"  # chance is 10%
        assert r["test_acc_std"] == 0.0  # one seed
        assert math.isfinite(r["train_loss_mean"]) and 0.0 < r["train_loss_mean"] < 5.0
        assert r["steps_per_run"] == 30  # 22 steps per epoch: 2 epochs, cut at 30
        assert r["wall_s_mean"] > 0.0
        assert r["fused_vs_eager"] is None  # CPU run
        assert len(r["curves"]["test_acc"]) == 1 and len(r["curves"]["test_acc"][0]) == 2
    assert rows["base"]["label"] == "SGD" and rows["base"]["rho"] is None
    assert rows["base"]["passes_per_step"] == 1.0 and rows["base"]["sam_steps_pct"] == 0.0
    assert rows["sam"]["passes_per_step"] == 2.0 and rows["sam"]["sam_steps_pct"] == 100.0
    assert rows["sam"]["rho"] == 0.07  # --rho override
    if "aesam" in rows:
        assert rows["aesam"]["rho"] == demo.DEMO_HPARAMS["aesam"]["rho"]
    assert report["failed"] == {} and report["skipped"] == {}
    if "aesam" in rows:
        pct, passes = rows["aesam"]["sam_steps_pct"], rows["aesam"]["passes_per_step"]
        assert 0.0 <= pct <= 100.0 and 1.0 <= passes <= 2.0
        # an ERM step is one pass, a SAM step two: the two statistics agree
        assert passes - 1.0 == pytest.approx(pct / 100.0, abs=1e-9)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--noise", "1.0"], "--noise must be in [0, 1)"),
        (["--noise", "-0.1"], "--noise must be in [0, 1)"),
        (["--noise", "abc"], "invalid float value"),
        (["--optimizers", "sgd,foo"], "unknown optimizer 'foo'"),
        (["--optimizers", ","], "--optimizers is empty"),
        (["--seeds", "0"], "--seeds must be >= 1"),
        (["--epochs", "0"], "--epochs must be >= 1"),
        (["--lr", "-1"], "--lr must be a finite number > 0"),
        (["--rho", "sam=x"], "is not a number"),
        (["--rho", "nosuch=0.1"], "--rho expects NAME=VALUE"),
        (["--base", "lion"], "invalid choice"),
        (["--model", "gpt"], "invalid choice"),
        (["--data", "mnist"], "unknown --data 'mnist'"),
        (["--data", "cifar10"], "--data cifar10 needs a path"),
        (["--data", "imagefolder:/no/such/folder"], "no such folder"),
        (["--data", "cifar10:/no/such/folder"], "no such folder"),
        (["--bogus"], "unrecognized arguments"),
    ],
)
def test_argument_errors(argv, message, tmp_path, capsys):
    """Bad input: one line on stderr naming the problem, exit code 2, no traceback."""
    rc = demo.main([*argv, "--out", str(tmp_path / "out"), "--no-progress"])
    out, err = capsys.readouterr()
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("sam-demo: error: ") and message in lines[0], err
    assert "Traceback" not in err


def test_malformed_data_folders(tmp_path, capsys):
    """A CIFAR folder without the batches, a corrupt batch, an image folder without classes."""
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [(f"cifar10:{empty}", "missing data_batch_1"), (f"cifar100:{empty}", "missing train")]

    bad = tmp_path / "cifar-10-batches-py"
    bad.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)]:
        (bad / name).write_bytes(b"not a pickle")
    with open(bad / "test_batch", "wb") as f:
        pickle.dump({b"data": [[0] * 10], b"labels": [0]}, f)
    cases.append((f"cifar10:{tmp_path}", "cannot read"))  # the parent folder is accepted too
    cases.append((f"imagefolder:{empty}", "imagefolder"))  # no class folders / no torchvision
    afile = tmp_path / "file.txt"
    afile.write_text("x")
    cases.append((f"cifar10:{afile}", "not a folder"))
    for spec, message in cases:
        rc = demo.main(["--data", spec, "--out", str(tmp_path / "out"), "--no-progress"])
        err = capsys.readouterr().err
        assert rc == 2, spec
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("sam-demo: error: "), err
        assert message in lines[0], err


def test_cifar_reader(tmp_path):
    """A tiny python-format CIFAR-10 tree is read without any download."""
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    rng = torch.Generator().manual_seed(0)
    for name, n in [(f"data_batch_{i}", 4) for i in range(1, 6)] + [("test_batch", 3)]:
        data = torch.randint(0, 256, (n, 3072), generator=rng, dtype=torch.uint8).numpy()
        labels = [i % 10 for i in range(n)]
        with open(root / name, "wb") as f:
            pickle.dump({b"data": data, b"labels": labels}, f)
    data = demo.load_data(f"cifar10:{tmp_path}", 32)
    assert data.x_train.shape == (20, 3, 32, 32) and data.x_train.dtype == torch.uint8
    assert data.x_test.shape == (3, 3, 32, 32) and data.num_classes == 10
    x = data.prepare(data.x_train[:4], train=True, gen=torch.Generator().manual_seed(0))
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32
    model = demo.build_model("cnn", data)
    assert model(x).shape == (4, 10)


@pytest.mark.parametrize("rate", [0.0, 0.1, 0.3, 0.75])
def test_label_noise_rate(rate):
    """Exactly round(rate * N) labels change, each to a different class."""
    data = demo.load_digits_data()
    y = data.y_train
    noisy = demo.add_label_noise(y, rate, 10, torch.Generator().manual_seed(1))
    changed = noisy != y
    assert int(changed.sum()) == round(rate * len(y))
    assert noisy.min() >= 0 and noisy.max() < 10
    # the wrong classes are spread over all the others (no fixed permutation of classes)
    if rate >= 0.3:
        pairs = {(int(a), int(b)) for a, b in zip(y[changed], noisy[changed])}
        assert len(pairs) > 50
    with pytest.raises(ValueError):
        demo.add_label_noise(y, 1.0, 10, torch.Generator())


def test_registry_imports_lazily():
    """The registry names every method; the module imports without the optimizer modules."""
    reg = demo.optimizer_registry()
    assert list(reg) == [
        "base",
        "sam",
        "asam",
        "crsam",
        "aesam",
        "aelooksam",
        "looksam",
        "sssam",
        "esam",
        "frobsam",
        "tracesam",
        "detsam",
        "gsam",
        "rsam",
        "friendlysam",
        "msam",
        "adamwmsam",
    ]
    assert set(demo.DEMO_HPARAMS) == set(reg) - {"base"}
    keys, all_ = demo.parse_optimizers("SGD, CR-SAM,sam,sam", reg)
    assert keys == ["base", "sam", "crsam"] and not all_
    assert demo.parse_optimizers("all", reg) == (list(reg), True)
    assert _available("sam")


def test_help_exits_zero(capsys):
    assert demo.main(["--help"]) == 0
    assert "--optimizers" in capsys.readouterr().out


def test_unwritable_out(tmp_path, capsys):
    target = tmp_path / "afile"
    target.write_text("x")
    rc = demo.main(["--out", str(target), "--optimizers", "sgd", "--no-progress"])
    assert rc == 2
    assert "exists and is not a folder" in capsys.readouterr().err


def test_default_folder_is_new(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first = demo.default_out_dir()
    first.mkdir(parents=True)
    second = demo.default_out_dir()
    assert second != first and second.parent == Path("demo_out")


def test_one_failing_optimizer_keeps_the_others(tmp_path, monkeypatch, capsys):
    """An optimizer that raises is reported (line + errors.log), the rest still run; exit 1."""
    real = demo.optimizer_registry

    def registry():
        reg = real()
        reg["sam"] = demo.Method("sam", "SAM", "python_api.sam", "SAM", {"rho": -1.0})
        return reg

    monkeypatch.setattr(demo, "optimizer_registry", registry)
    out_dir = tmp_path / "out"
    rc = demo.main(
        ["--optimizers", "sgd,sam", "--seeds", "1", "--max-steps", "3", "--no-progress"]
        + ["--out", str(out_dir), "--device", "cpu"]
    )
    out, err = capsys.readouterr()
    assert rc == 1
    assert "SAM failed (ValueError: rho must be" in err
    assert "ValueError" in (out_dir / "errors.log").read_text()
    report = json.loads((out_dir / "results.json").read_text())
    assert [r["optimizer"] for r in report["rows"]] == ["base"]
    assert "sam" in report["failed"]
    assert (out_dir / "curves.png").exists()


def test_model_needing_torchvision(tmp_path, capsys):
    """--model resnet18 without torchvision: one clear line, exit 2 (checked before any data)."""
    try:
        import torchvision.models  # noqa: F401
    except Exception:
        pass
    else:
        pytest.skip("torchvision is importable here")
    rc = demo.main(["--model", "resnet18", "--out", str(tmp_path / "o"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "needs torchvision" in err[0]


def test_sharpness_table(tmp_path, capsys):
    """--sharpness writes the CR-SAM Table-3 style report of the trained models."""
    rc = demo.main(
        "--optimizers sgd,sam --seeds 1 --epochs 1 --max-steps 10 --no-progress --device cpu "
        f"--sharpness 4 --out {tmp_path / 'o'}".split()
    )
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "| optimizer | ‖∇L‖ | Tr(H) | C(w) |" in out
    rows = json.loads((tmp_path / "o" / "sharpness.json").read_text())
    text = json.dumps(rows)
    assert "SGD" in text and "SAM" in text
    assert (tmp_path / "o" / "sharpness.md").exists()
    assert demo.main(["--sharpness", "-1", "--out", str(tmp_path / "p")]) == 2
