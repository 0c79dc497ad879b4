"""Fault 7 of the fault table: bad configs and bad data, through the public entry points.

The checks themselves belong to TRAIN (config) and DATA (loader); these tests
inject one fault of each kind, assert the error names its cause, and record the
rows of the fault table.
"""

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from cluster.faultlog import record

ROOT = Path(__file__).resolve().parent.parent


def _train(tmp_path, yaml_text: str, *extra: str) -> tuple[subprocess.CompletedProcess, float]:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml_text)
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "hpcsgd", "train", str(cfg), "--out", str(tmp_path / "out"),
                          *extra], capture_output=True, text=True, cwd=str(ROOT), timeout=120)
    return res, time.perf_counter() - t0


@pytest.mark.parametrize("case", ["unknown_key", "bad_value", "missing_data"])
def test_bad_config_exits_with_the_key_named(tmp_path, request, case):
    pytest.importorskip("hpcsgd.train.config")
    yaml_text, expect, what = {
        "unknown_key": ("dataset: synthetic\nbatch_per_rnak: 8\n", "batch_per_rnak",
                        "a misspelt key (batch_per_rnak)"),
        "bad_value": ("dataset: synthetic\nbatch_per_rank: -8\n", "batch_per_rank",
                      "a negative batch size (batch_per_rank: -8)"),
        "missing_data": ("dataset: imagenet_folder\ndata_path: /nonexistent/imagenet\n",
                         "/nonexistent/imagenet", "a data path that does not exist"),
    }[case]
    res, seconds = _train(tmp_path, yaml_text)
    out = res.stdout + res.stderr
    assert res.returncode != 0, out
    assert expect in out, out
    assert "Traceback" not in out, f"a config error should be one clear line, not a traceback:\n{out}"
    assert not (tmp_path / "out" / "checkpoints").exists()
    record(f"f7_config_{case}", order=7.0 + 0.1 * ["unknown_key", "bad_value", "missing_data"].index(case),
           fault="Bad config: " + what,
           injected="hpcsgd train bad.yaml with " + yaml_text.strip().replace("\n", "; "),
           outcome=f"exit code {res.returncode} before any collective; the message names {expect!r}",
           detect_s=seconds, data_lost="none (nothing started)", test=request.node.nodeid,
           evidence=out.strip()[-300:])


def _image_folder(root: Path) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        d = root / "train" / c
        d.mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(d / f"{i}.JPEG")
    bad = root / "train" / "dog" / "2.JPEG"
    bad.write_bytes(bad.read_bytes()[:200])  # truncated JPEG
    return bad


@pytest.mark.parametrize("on_bad", ["error", "skip"])
def test_bad_image_is_named_or_skipped_and_counted(tmp_path, request, on_bad):
    data = pytest.importorskip("hpcsgd.data")
    from hpcsgd.errors import DataError

    bad = _image_folder(tmp_path)
    ds = data.build_dataset("imagenet_folder", str(tmp_path), split="train")
    loader = data.Loader(ds, 8, workers=0, transform="eval", on_bad=on_bad, shuffle=False)
    t0 = time.perf_counter()
    try:
        if on_bad == "error":
            with pytest.raises(DataError) as ei:
                for _ in loader:
                    pass
            msg = str(ei.value)
            assert str(bad) in msg or bad.name in msg, msg
            outcome = "DataError naming the file; `hpcsgd train` aborts the job with it"
            lost = "the running epoch (resume from the last checkpoint after fixing the file)"
        else:
            batches = [x for x, _ in loader]
            assert len(batches) == 1 and np.isfinite(batches[0]).all()
            assert loader.bad_files == 1, loader.bad_files
            msg = f"bad_files={loader.bad_files}"
            outcome = "the sample is replaced by another one, counted in loader.bad_files (=1) and logged"
            lost = "one sample per bad file per epoch"
    finally:
        loader.close()
    record(f"f7_data_{on_bad}", order=7.5 if on_bad == "error" else 7.6,
           fault=f"Bad data: a truncated JPEG (on_bad='{on_bad}')",
           injected="imagenet_folder with one JPEG cut to 200 bytes",
           outcome=outcome, detect_s=time.perf_counter() - t0, data_lost=lost, test=request.node.nodeid,
           evidence=msg[:300])
