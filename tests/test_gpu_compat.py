"""hpcsgd.gpu_compat: the CUDA wheel preloading and the version/pair diagnosis, without a GPU."""

import importlib.metadata
import subprocess
import sys

import pytest

from hpcsgd import gpu_compat as gc


def test_preload_retries_a_library_whose_dependency_loads_later():
    loaded = []

    def load(path):
        if path.endswith("libcudnn.so.8") and "/x/libcudnn_ops_infer.so.8" not in loaded:
            raise OSError("libcudnn_ops_infer.so.8: cannot open shared object file")
        loaded.append(path)

    ok, failed = gc.preload(["/x/libcudnn.so.8", "/x/libcudnn_ops_infer.so.8"], load)
    assert ok == ["libcudnn_ops_infer.so.8", "libcudnn.so.8"] and failed == []


def test_preload_reports_what_cannot_load_and_stops():
    def load(path):
        if "bad" in path:
            raise OSError("missing dependency")

    assert gc.preload(["/x/bad.so", "/x/good.so.1"], load) == (["good.so.1"], ["bad.so"])


def test_wheel_libraries_come_from_the_installed_wheels_record(tmp_path, monkeypatch):
    info = tmp_path / "nvidia_nccl_cu12-2.20.5.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: nvidia-nccl-cu12\nVersion: 2.20.5\n")
    (info / "RECORD").write_text("nvidia/nccl/lib/libnccl.so.2,,\nnvidia/nccl/include/nccl.h,,\n"
                                 "nvidia/__init__.py,,\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    libs = gc.wheel_libraries(("nvidia-not-installed-cu12", "nvidia-nccl-cu12"))
    assert libs == [tmp_path / "nvidia" / "nccl" / "lib" / "libnccl.so.2"]


@pytest.mark.parametrize("version, runtime, cc, cudnn, nccl, expect", [
    ("13.6.0", 12080, "90", True, True, []),
    ("14.2.0", 13000, "90", False, True, ["removed cupy.cudnn", "cuDNN is not enabled"]),
    ("7.8.0", 10020, "90", True, True, ["older than the supported", "needs CUDA >= 11.8"]),
    ("13.6.0", 12080, None, True, False, ["cannot load NCCL"]),
])
def test_problems_name_each_defect_of_the_pair(version, runtime, cc, cudnn, nccl, expect):
    found = gc.problems(version, runtime, cc, cudnn, nccl)
    assert len(found) == len(expect)
    for text, needle in zip(found, expect):
        assert needle in text


def test_import_hpcsgd_applies_the_shim_and_never_needs_cupy():
    code = ("import hpcsgd, hpcsgd.gpu_compat as g, sys; "
            "assert g._applied is not None; assert 'cupy' not in sys.modules; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
