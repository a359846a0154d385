"""The README's install commands as far as CI can check them without running them: the
CPU-only section is valid shell, each pip option exists in this pip, and it installs the
package the quick start does."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).parents[1] / "README.md"


def _section_commands(title: str) -> list[str]:
    text = README.read_text()
    section = text.split(f"### {title}\n", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```sh\n(.*?)```", section, re.S)
    return block.strip().splitlines()


def test_cpu_only_install_commands_are_what_pip_takes() -> None:
    commands = _section_commands("CPU-only install")
    script = "\n".join(commands)
    assert subprocess.run(["bash", "-n", "-c", script]).returncode == 0
    pip_help = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--help"], capture_output=True, text=True
    ).stdout
    installs = [c.split() for c in commands if c.startswith(".venv/bin/pip install")]
    assert len(installs) == 2
    for words in installs:
        for option in (w for w in words if w.startswith("--")):
            assert f"{option} " in pip_help or f"{option}=" in pip_help, option
    torch, package = installs
    assert "torch" in torch and torch[torch.index("--index-url") + 1].endswith("/whl/cpu")
    assert package[-1] == "'.[demo]'"  # as the quick start
    assert ".venv/bin/pip install -e '.[demo]'" in README.read_text().split("### CPU")[0]


def _gigabytes(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 1e9


def test_the_install_size_counts_each_large_part_as_installed() -> None:
    """Each part the README names is within 15 % of what is installed here (CI installs the
    default, CUDA build, as users do), and the parts add up to the total stated."""
    text = " ".join(README.read_text().split("### CPU")[0].split())
    stated = re.search(
        r"about \*\*([\d.]+) GB\*\* on disk once installed \(([\d.]+) GB of NVIDIA libraries, "
        r"([\d.]+) GB of torch, ([\d.]+) GB of triton,.* and ([\d.]+) GB for everything else",
        text,
    )
    assert stated, "the quick start's install size"
    total, nvidia, torch, triton, rest = map(float, stated.groups())
    assert abs(nvidia + torch + triton + rest - total) < 0.15
    packages = Path(next(p for p in sys.path if p.endswith("site-packages")))
    for name, said in (("nvidia", nvidia), ("torch", torch), ("triton", triton)):
        if (packages / name).is_dir():  # a CPU-only build has no nvidia nor triton
            assert abs(_gigabytes(packages / name) - said) <= 0.15 * said + 0.05, name
