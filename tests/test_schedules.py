"""Schedules against the papers' numbers (papers.md sections 1(a), 3, 4)."""

import json
import subprocess
import sys

import pytest

from hpcsgd import schedules as S
from hpcsgd.errors import ConfigError


def test_linear_scaling():
    assert S.linear_scaling_lr(256) == pytest.approx(0.1)
    assert S.linear_scaling_lr(8192) == pytest.approx(3.2)
    assert S.linear_scaling_lr(32768) == pytest.approx(12.8)
    with pytest.raises(ConfigError):
        S.linear_scaling_lr(0)


# papers.md sec. 1(a) table (ELU-consistent form), to its printed precision
ALPHA_TABLE = [(0, 0.0092), (5, 0.068), (8, 0.225), (9, 0.335), (10, 0.5), (11, 0.7), (12, 0.9),
               (12.5, 1.0), (13, 1.0), (50, 1.0)]


@pytest.mark.parametrize("epoch,expected", ALPHA_TABLE)
def test_alpha_sgd_table(epoch, expected):
    assert S.alpha_sgd(epoch) == pytest.approx(expected, abs=6e-4)


def test_alpha_sgd_transcribed_form_is_clamped_and_continuous_form_fractional():
    assert S.alpha_sgd(11.25, form="transcribed") == pytest.approx(1.0)
    assert S.alpha_sgd(12.0, form="transcribed") == 1.0  # would be 1.3 unclamped
    assert max(S.alpha_sgd(e / 10, form="transcribed") for e in range(200)) <= 1.0
    # per iteration (fractional epoch), continuous at beta_c
    assert S.alpha_sgd(10.5) == pytest.approx(0.6)
    assert S.alpha_sgd(10 - 1e-9) == pytest.approx(0.5, abs=1e-8)
    with pytest.raises(ConfigError):
        S.alpha_sgd(1.0, form="bogus")


def test_akiba_slow_start_32k():
    base = S.linear_scaling_lr(32768)
    table = [(0, 6.4), (39.99, 6.4), (40, 0.96), (69.9, 0.96), (70, 0.128), (85, 0.0128), (89.9, 0.0128)]
    for e, lr in table:
        assert S.akiba_lr(e, base) == pytest.approx(lr), e


def test_goyal_warmup_8k():
    peak = S.linear_scaling_lr(8192)
    assert S.goyal_lr(0.0, peak) == pytest.approx(0.1)
    assert S.goyal_lr(2.5, peak) == pytest.approx(0.1 + (3.2 - 0.1) / 2)  # linear per iteration
    assert S.goyal_lr(5.0, peak) == pytest.approx(3.2)
    assert S.goyal_lr(29.99, peak) == pytest.approx(3.2)
    assert S.goyal_lr(30, peak) == pytest.approx(0.32)
    assert S.goyal_lr(60, peak) == pytest.approx(0.032)
    assert S.goyal_lr(80, peak) == pytest.approx(0.0032)
    # no ramp for batches below 256
    assert S.goyal_lr(0.0, S.linear_scaling_lr(128)) == pytest.approx(0.05)


def test_poly_and_cosine():
    assert S.poly_lr(0, 2.9, 90, warmup_epochs=5) == 0.0
    assert S.poly_lr(2.5, 2.9, 90, warmup_epochs=5) == pytest.approx(1.45)
    assert S.poly_lr(5, 2.9, 90, warmup_epochs=5) == pytest.approx(2.9)
    assert S.poly_lr(47.5, 2.9, 90, warmup_epochs=5) == pytest.approx(2.9 * 0.25)  # (1 - 1/2)^2
    assert S.poly_lr(90, 2.9, 90, warmup_epochs=5) == pytest.approx(0.0)
    assert S.cosine_lr(0, 1.0, 10) == pytest.approx(1.0)
    assert S.cosine_lr(5, 1.0, 10) == pytest.approx(0.5)
    assert S.cosine_lr(10, 1.0, 10) == pytest.approx(0.0, abs=1e-12)
    assert S.step_decay(59, 1.0, (30, 60)) == pytest.approx(0.1)
    assert S.epoch_at(78, 39) == 2.0


def _cli(*args):
    code = ("import sys; from hpcsgd.cli import main; rc = main(sys.argv[1:]); "
            "assert 'mpi4py' not in sys.modules, 'schedule imported mpi4py'; sys.exit(rc)")
    out = subprocess.run([sys.executable, "-c", code, "schedule", *args], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_cli_akiba_32k_prints_6_4_for_epochs_0_to_40(tmp_path):
    text = _cli("--recipe", "akiba", "--global-batch", "32768", "--epochs", "90", "--iters-per-epoch", "39")
    rows = [line.split() for line in text.splitlines() if not line.startswith("#")][1:]
    lr = {int(r[0]): float(r[2]) for r in rows}
    assert all(lr[e] == pytest.approx(6.4) for e in range(40))
    assert (lr[40], lr[70], lr[85]) == pytest.approx((0.96, 0.128, 0.0128))
    alpha = {int(r[0]): float(r[3]) for r in rows}
    assert alpha[10] == pytest.approx(0.5) and alpha[13] == 1.0



def test_cli_json_and_plot(tmp_path, capsys):
    from hpcsgd.cli import main

    assert main(["schedule", "--recipe", "goyal", "--global-batch", "8192", "--epochs", "90",
                 "--iters-per-epoch", "156", "--json", "--plot", str(tmp_path / "g.png")]) == 0
    data = json.loads(capsys.readouterr().out)
    lrs = [b["lr"] for b in data["boundaries"]]
    assert lrs[0] == pytest.approx(0.1) and lrs[5] == pytest.approx(3.2) and lrs[30] == pytest.approx(0.32)
    assert (tmp_path / "g.png").stat().st_size > 1000
