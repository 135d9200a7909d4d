"""HPC deployment: conda env + container of every rule, the container definitions, lint, profiles.

No container runtime or conda exists here (docker is client-only, no apptainer package for this
Debian), so the Dockerfile and the Apptainer definition are parsed and checked for what they must
do: install this package with its shipped model and smoke-test it at build time. The smoke script
itself runs here against the installed package, and the wheel that `pip install .` builds is
checked for the model.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from pipeline.cohort import CohortLayout

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = Path(sys.executable).parent / "snakemake"
CONTAINERS = REPO / "containers"
ENVS = REPO / "workflows" / "envs"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
MODEL = "pipeline/weights/cellsam_default.pt"

sys.path.insert(0, str(Path(__file__).parent))
from test_workflow import _fake_slides, _jobs, _sheet, snakemake  # noqa: E402


def _rule_blocks() -> dict[str, str]:
    """Rule name -> its text, for every rule/checkpoint of the Snakefile and workflows/rules/*.smk."""
    blocks = {}
    for path in [REPO / "Snakefile", *sorted((REPO / "workflows" / "rules").glob("*.smk"))]:
        text = path.read_text(encoding="utf-8")
        for m in re.finditer(r"^(?:rule|checkpoint) (\w+):\n((?:[ \t]+.*\n|\n)*)", text, re.M):
            blocks[m.group(1)] = m.group(2)
    return blocks


def _dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out, buf = [], ""
    for line in text.splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        buf += line.rstrip()
        if buf.endswith("\\"):
            buf = buf[:-1] + " "
            continue
        word, _, rest = buf.strip().partition(" ")
        out.append((word.upper(), " ".join(rest.split())))
        buf = ""
    assert not buf, "Dockerfile ends inside a line continuation"
    return out


def _def_sections(text: str) -> tuple[dict[str, str], dict[str, list[str]]]:
    """Header keywords and %section bodies of an Apptainer definition file."""
    header, sections, current = {}, {}, None
    for line in text.splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        if line.startswith("%"):
            current = line[1:].split()[0]
            assert current not in sections, f"duplicate section %{current}"
            sections[current] = []
        elif current is None:
            key, sep, value = line.partition(":")
            assert sep, f"bad header line {line!r}"
            header[key.strip()] = value.strip()
        else:
            sections[current].append(line.strip())
    return header, sections


# ------------------------------------------------------------------------------ rules: conda + container


def test_every_rule_with_a_command_has_conda_and_container():
    blocks = _rule_blocks()
    assert {"check", "tile", "infer", "export", "cohort"} <= set(blocks)
    for name, body in blocks.items():
        if "shell:" not in body:  # e.g. `all`: inputs only, nothing runs
            assert not re.search(r"^\s+(run|script|wrapper):", body, re.M), name
            continue
        conda = re.search(r"^\s+conda:\s*\n\s+\"([^\"]+)\"", body, re.M)
        assert conda and conda.group(1) == "../envs/cellsam.yaml", name
        assert re.search(r"^\s+container:\s*\n\s+config\[\"container_image\"\]", body, re.M), name


def test_conda_env_installs_the_declared_dependencies_and_the_package():
    env = yaml.safe_load((ENVS / "cellsam.yaml").read_text(encoding="utf-8"))
    deps = env["dependencies"]
    python = [d for d in deps if isinstance(d, str) and d.startswith("python")]
    assert len(python) == 1
    version = python[0].split("=", 1)[1]
    low = PYPROJECT["project"]["requires-python"].removeprefix(">=")
    assert tuple(map(int, version.split("."))) >= tuple(map(int, low.split(".")))
    assert "pip" in deps
    pip = [d for d in deps if isinstance(d, dict)][0]["pip"]
    assert pip == PYPROJECT["project"]["dependencies"]  # verbatim: drift fails here
    # the package itself: the post-deploy hook installs the checkout that common.smk names
    hook = (ENVS / "cellsam.post-deploy.sh").read_text(encoding="utf-8")
    assert re.search(r'pip install --no-deps -e "\$CELLSAM_REPO"', hook)
    assert "cellsam --version" in hook
    common = (REPO / "workflows" / "rules" / "common.smk").read_text(encoding="utf-8")
    assert "CELLSAM_REPO=str(Path(workflow.basedir).resolve())" in common


def test_container_image_default_is_the_package_version():
    schema = yaml.safe_load((REPO / "workflows" / "schemas" / "config.schema.yaml").read_text(encoding="utf-8"))
    image = schema["properties"]["container_image"]["default"]
    example = yaml.safe_load((REPO / "workflows" / "config" / "config.yaml").read_text(encoding="utf-8"))
    assert example["container_image"] == image
    assert image.startswith("docker://") and image.endswith(":" + PYPROJECT["project"]["version"])


# ---------------------------------------------------------------------------------------- containers


def test_dockerfile_installs_the_package_with_the_model_and_smoke_tests_it():
    steps = _dockerfile_instructions((CONTAINERS / "Dockerfile").read_text(encoding="utf-8"))
    kinds = [k for k, _ in steps]
    assert kinds[0] == "FROM" and steps[0][1].startswith("python:3.")
    assert set(kinds) <= {"FROM", "ENV", "RUN", "COPY", "WORKDIR", "CMD", "LABEL", "ARG"}
    copies = [v.split() for k, v in steps if k == "COPY"]
    copied = {src for c in copies for src in c[:-1]}
    assert {"pyproject.toml", "README.md", "pipeline", "containers/smoke.py"} <= copied
    for c in copies:  # every source exists in the build context (the repository root)
        assert all((REPO / src).exists() for src in c[:-1]), c
    runs = [v for k, v in steps if k == "RUN"]
    cpu = next(i for i, r in enumerate(runs) if "whl/cpu" in r)
    install = next(i for i, r in enumerate(runs) if re.search(r"pip install /tmp/cellsam\b", r))
    smoke = next(i for i, r in enumerate(runs) if "cellsam --version" in r and "smoke.py" in r)
    assert cpu < install < smoke  # CPU torch first, so that `pip install .` pulls no CUDA wheels
    # the build context keeps what the image needs, the model above all
    ignore = [ln.strip() for ln in (REPO / ".dockerignore").read_text(encoding="utf-8").splitlines()
              if ln.strip() and not ln.startswith("#")]
    for path in ("pyproject.toml", "README.md", MODEL, "pipeline/__init__.py", "containers/smoke.py"):
        parts = Path(path).parts
        prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
        assert not any(fnmatch.fnmatch(p, pat.rstrip("/")) for pat in ignore for p in prefixes), path


def test_apptainer_definition_installs_the_package_with_the_model_and_smoke_tests_it():
    header, sections = _def_sections((CONTAINERS / "cellsam.def").read_text(encoding="utf-8"))
    assert header["Bootstrap"] == "docker" and header["From"].startswith("python:3.")
    assert set(sections) <= {"labels", "files", "environment", "post", "test", "runscript", "help"}
    files = dict(line.split() for line in sections["files"])
    for src in ("pyproject.toml", "README.md", "pipeline", "containers/smoke.py"):
        assert src in files and (REPO / src).exists(), src
    post = sections["post"]
    install = next(i for i, ln in enumerate(post) if ln == f"python -m pip install {files['pyproject.toml'].rsplit('/', 1)[0]}")
    assert post.index("cellsam --version") > install
    assert post.index(f"python {files['containers/smoke.py']}") > install
    assert f"python {files['containers/smoke.py']}" in sections["test"]
    assert sections["runscript"] == ['exec cellsam "$@"']
    labels = dict(line.split(None, 1) for line in sections["labels"])
    assert labels["org.opencontainers.image.version"] == PYPROJECT["project"]["version"]


def test_pip_install_brings_the_shipped_model(tmp_path):
    """The wheel that `pip install .` builds in both images holds the model (package data)."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "pipeline", src / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                           "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    import zipfile

    (wheel,) = (tmp_path / "dist").glob("cellsam_pipeline-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        info = zf.getinfo(MODEL)
        assert info.file_size == (REPO / MODEL).stat().st_size
        assert "pipeline/cli/__init__.py" in zf.namelist()


def test_smoke_script_passes_on_the_installed_package(tmp_path):
    """The build-time smoke check, run here: the shipped model loads and finds nuclei."""
    proc = subprocess.run([sys.executable, str(CONTAINERS / "smoke.py")], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    m = re.fullmatch(r"smoke: ok: cellsam_default\.pt loaded, (\d+) nuclei in a 256x256 px synthetic tile\n",
                     proc.stdout)
    assert m and int(m.group(1)) > 0, proc.stdout


# ----------------------------------------------------------------------------------- lint + profiles


def test_lint_is_clean_with_the_example_config():
    """`snakemake --lint` from the repository root with the shipped config: no findings at all.

    Snakemake exits 0 with or without findings, so the output is parsed.
    """
    proc = subprocess.run([str(SNAKEMAKE), "--lint"], capture_output=True, text=True, timeout=120, cwd=REPO)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-2000:]
    assert "Lints for" not in out, out
    assert "Congratulations, your workflow is in a good condition!" in out


def test_lint_is_clean_with_every_optional_branch(tmp_path):
    slides = _fake_slides(tmp_path, "a.svs")
    cfg = {"samples": _sheet(tmp_path, [("a", slides[0], 0.25)]), "keep_stores": True,
           "export": {"geojson_plain": True},
           "infer": {"model": "classical", "refine": True, "scheduler": "tcp://10.0.0.5:8786"}}
    proc = snakemake(tmp_path, "--lint", config=cfg)
    out = proc.stdout + proc.stderr
    assert "Lints for" not in out and "Congratulations" in out, out


def test_local_profile_uses_all_cores_and_one_gpu_job():
    profile = yaml.safe_load((REPO / "workflows" / "profiles" / "local" / "config.yaml").read_text(encoding="utf-8"))
    assert profile["cores"] == "all"
    assert profile["resources"]["gpu"] == 1


def _passed_check(workdir: Path, sid: str) -> None:
    layout = CohortLayout(workdir / "results")
    layout.status_dir.mkdir(parents=True, exist_ok=True)
    layout.status(sid).write_text(json.dumps({"slide": sid, "ok": True, "error": None}))


def test_local_profile_run_gets_all_cores(tmp_path):
    from snakemake.utils import available_cpu_count  # what `cores: all` resolves to

    slides = _fake_slides(tmp_path, "a.svs")  # unreadable: its (real, quick) check records ok: false
    cfg = {"samples": _sheet(tmp_path, [("a", slides[0], None)]), "infer": {"model": "classical"}}
    local = str(REPO / "workflows" / "profiles" / "local")
    proc = snakemake(tmp_path, "--until", "check", "--profile", local, config=cfg, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"Provided cores: {available_cpu_count()}" in proc.stdout + proc.stderr
    _passed_check(tmp_path, "a")
    proc = snakemake(tmp_path, "-n", "-p", "--profile", local)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (infer,) = [j for j in _jobs(proc.stdout) if j["rule"] == "infer"]
    assert infer["resources"]["gpu"] == "1"  # device auto: one GPU job at a time (profile: gpu: 1)


@pytest.mark.parametrize(
    "infer, gpu",
    [({}, "1"), ({"device": "cuda"}, "1"), ({"device": "cpu"}, "0"), ({"scheduler": "tcp://10.0.0.5:8786"}, "0")],
)
def test_slurm_infer_requests_a_gpu_only_when_the_device_is_not_cpu(tmp_path, infer, gpu):
    slides = _fake_slides(tmp_path, "a.svs")
    _passed_check(tmp_path, "a")
    cfg = {"samples": _sheet(tmp_path, [("a", slides[0], None)]), "infer": {"model": "classical", **infer}}
    proc = snakemake(tmp_path, "-n", "-p", "--profile", str(REPO / "workflows" / "profiles" / "slurm"), config=cfg)
    assert proc.returncode == 0, proc.stderr[-2000:]
    jobs = _jobs(proc.stdout)
    (job,) = [j for j in jobs if j["rule"] == "infer"]
    assert job["resources"].get("gpu", "0") == gpu
    assert job["resources"]["slurm_partition"] == "gpu"  # the profile's; cpus_per_gpu applies only with a GPU
    for other in jobs:
        if other["rule"] in ("tile", "export", "cohort"):
            assert other["resources"].get("gpu", "0") == "0"
