"""`pip install .` (a real wheel, not the editable checkout) maps kernels/ and engine/ into fusealign."""

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_maps_kernels_and_engine_into_the_package(tmp_path):
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "w"),
         str(ROOT)], capture_output=True, text=True, cwd=tmp_path)
    assert build.returncode == 0, build.stderr
    (wheel,) = (tmp_path / "w").glob("fusealign-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for f in ("fusealign/__init__.py", "fusealign/kernels/reference.py", "fusealign/kernels/linear_logps.py",
              "fusealign/kernels/linear_logps_triton.py", "fusealign/engine/__init__.py", "fusealign/head.py",
              "fusealign/engine/study/task.py", "fusealign/losses/reward.py",
              "fusealign/kernels/tuned.json"):  # the candidate table (kernels/candidates.py) ships with the kernels
        assert f in names, f
    assert "fusealign/losses/preference.py" in names and "fusealign/losses/policy.py" in names
    assert not any(n.startswith(("kernels/", "engine/")) for n in names), "bare top-level packages leaked"
    meta = next(n for n in names if n.endswith(".dist-info/METADATA"))
    requires = {line.split()[1].split(";")[0] for line in zipfile.ZipFile(wheel).read(meta).decode().splitlines()
                if line.startswith("Requires-Dist:") and "extra ==" not in line}
    # Everything the commands import is installed by `pip install .` (compare's plot needs matplotlib).
    assert {"torch", "triton", "numpy", "safetensors", "transformers", "tqdm", "matplotlib"} <= requires, requires

    target = tmp_path / "site"
    inst = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
                           str(wheel)], capture_output=True, text=True)
    assert inst.returncode == 0, inst.stderr
    code = ("import fusealign, fusealign.kernels.reference as r; "
            "assert fusealign.__file__.startswith(%r), fusealign.__file__; "
            "print(fusealign.linear_logps.__name__, r.linear_logps_reference.__name__)" % str(target))
    # -I style isolation: only the fresh target dir (plus the venv's torch) is importable.
    run = subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, %r); %s" % (str(target), code)],
                         capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["linear_logps", "linear_logps_reference"]
