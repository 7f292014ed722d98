"""Wheels for a machine with torch but no package index, and their install there.

``build``: on a machine with a package index and the project installed, download (binary) or build (source-only)
a wheel of every distribution the project needs, at the versions installed here, except those a torch machine
already has (``benchmarks/scripts/torch_machine_packages.txt``), SimpleITK (50 MB; nnU-Net reads images with nibabel
instead, see ``install``) and imagecodecs (26 MB, never imported by nnU-Net). Binary wheels are fetched for each
``--python`` version, pure-Python ones once.

``install`` (on the offline machine, before the project can be imported): install from the folder every wheel whose
distribution is missing here (a preinstalled package is never shadowed: torch's numpy stays), put an empty
``SimpleITK`` on the path when the real one is missing, then check that every requirement of the project, and of
theirs, is installed at a version that satisfies it; a missing one is named with what needs it.

This file uses the standard library only (and pip's vendored ``packaging``), so it runs as
``python3 benchmarks/semi_lab/offline.py install WHEELS SITE`` before the project's dependencies exist.
"""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import os
import re
import subprocess
import sys
from os.path import abspath, dirname, isdir, join

PROJECT_ROOT = dirname(dirname(dirname(abspath(__file__))))  # benchmarks/semi_lab/offline.py: run as a script too
# SimpleITK (50 MB): replaced by nnU-Net's NibabelIO on the offline machine (see install); imagecodecs (26 MB): a
# requirement of nnunetv2 that it never imports (TIFF codecs); argparse (a Python 2 backport that unittest2 asks for):
# on PYTHONPATH it would shadow the standard library's argparse
NOT_CARRIED = {"simpleitk", "imagecodecs", "argparse"}
TORCH_MACHINE_PACKAGES = join(PROJECT_ROOT, "benchmarks", "scripts", "torch_machine_packages.txt")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64")


class OfflineError(RuntimeError):
    """A wheel folder or environment that cannot run the project; the message names what is missing."""


def canonical(name: str) -> str:
    """PEP 503 name: ``Connected_Components.3D`` -> ``connected-components-3d``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def project_requirements(pyproject: str = join(PROJECT_ROOT, "pyproject.toml")) -> list[str]:
    """The ``[project] dependencies`` of the checkout's pyproject.toml and its ``benchmark`` extra, which the cells
    run (the project itself need not be installed)."""
    import tomllib

    with open(pyproject, "rb") as f:
        project = tomllib.load(f)["project"]
    return project["dependencies"] + project.get("optional-dependencies", {}).get("benchmark", [])


def requirement_closure(requirements: list[str], skip: set[str] = frozenset()) -> dict[str, dict]:
    """Every distribution ``requirements`` need, recursively, as installed here: canonical name -> {"version":
    installed version or None, "wanted": the specifier, "by": who asked first}. Markers are evaluated for this
    interpreter (extras off); names in ``skip`` are listed but not followed."""
    from pip._vendor.packaging.requirements import Requirement

    found: dict[str, dict] = {}
    stack = [(Requirement(r), "nnunet-semi") for r in requirements]
    while stack:
        requirement, parent = stack.pop(0)
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue
        name = canonical(requirement.name)
        if name in found:
            continue
        try:
            distribution = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            found[name] = {"version": None, "wanted": str(requirement.specifier), "by": parent}
            continue
        version = distribution.version
        found[name] = {"version": version, "wanted": str(requirement.specifier), "by": parent,
                       "satisfied": requirement.specifier.contains(version, prereleases=True)}
        if name not in skip:
            stack += [(Requirement(r), name) for r in distribution.requires or []]
    return found


def torch_machine_packages(path: str = TORCH_MACHINE_PACKAGES) -> set[str]:
    """Names a GPU machine with torch preinstalled already has (one per line, # comments)."""
    with open(path) as f:
        return {canonical(line.split("#")[0].strip()) for line in f if line.split("#")[0].strip()}


def build(wheel_dir: str, pythons: list[str], include: list[str]) -> list[str]:
    """Fill ``wheel_dir``; returns the distributions it holds wheels for."""
    closure = requirement_closure(project_requirements())
    missing = sorted(n for n, info in closure.items() if info["version"] is None and n not in NOT_CARRIED)
    if missing:
        raise OfflineError(f"not installed here: {', '.join(missing)}; build the wheels from an environment with "
                           f"the project installed (pip install -e .).")
    have = torch_machine_packages() - {canonical(n) for n in include}
    wanted = sorted(n for n in closure if n not in have and n not in NOT_CARRIED)
    os.makedirs(wheel_dir, exist_ok=True)
    for name in wanted:
        pin = f"{name}=={closure[name]['version']}"
        pure = _download(pin, wheel_dir, pythons)
        if not pure:
            print(f"{pin}: no binary wheel for every Python asked; building it from source")
            subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", wheel_dir, pin],
                           check=True)
    size = sum(os.path.getsize(join(wheel_dir, f)) for f in os.listdir(wheel_dir) if f.endswith(".whl"))
    print(f"{wheel_dir}: wheels of {len(wanted)} distributions for Python {', '.join(pythons)}, "
          f"{size / 2 ** 20:.1f} MiB")
    return wanted


def _download(pin: str, wheel_dir: str, pythons: list[str]) -> bool:
    """Binary wheels of ``pin`` for each Python (a pure one once); False when some Python has none."""
    for python in pythons:
        command = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                   "--python-version", python, "--implementation", "cp", "-d", wheel_dir, pin]
        for platform in (*PLATFORMS, "any"):
            command += ["--platform", platform]
        if subprocess.run(command, capture_output=True).returncode != 0:
            return False
    return True


def wheel_distribution(filename: str) -> str:
    """``nnunetv2-2.8.1-py3-none-any.whl`` -> ``nnunetv2``."""
    return canonical(os.path.basename(filename).split("-")[0])


def install(wheel_dir: str, site: str) -> list[str]:
    """Install the wheels of distributions missing here into ``site`` (put it on PYTHONPATH), then check."""
    if not isdir(wheel_dir):
        raise OfflineError(f"wheel folder {wheel_dir} does not exist: build it with scripts/build_wheels.sh on a "
                           f"machine with a package index and carry it.")
    sys.path.insert(0, site)  # distributions installed by an earlier call count as present
    names = sorted({wheel_distribution(f) for f in os.listdir(wheel_dir) if f.endswith(".whl")})
    todo = []
    for name in names:
        try:
            metadata.distribution(name)
        except metadata.PackageNotFoundError:
            todo.append(name)
    todo = [n for n in todo if n not in NOT_CARRIED]  # e.g. a folder built before a name joined NOT_CARRIED
    if todo:
        # pip picks, per name, the wheel that fits this interpreter among those for several Pythons
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--disable-pip-version-check", "--find-links", wheel_dir, "--target", site, *todo],
                       check=True)
    shadowing = sorted(n.removesuffix(".py") for n in os.listdir(site)
                       if n.removesuffix(".py") in sys.stdlib_module_names)
    if shadowing:
        raise OfflineError(f"{site} holds {', '.join(shadowing)}, which would shadow the standard library on "
                           f"PYTHONPATH; remove them and their wheels from {wheel_dir}.")
    if _missing_simpleitk():
        os.makedirs(join(site, "SimpleITK"), exist_ok=True)
        with open(join(site, "SimpleITK", "__init__.py"), "w") as f:
            f.write("# empty: nnU-Net imports SimpleITK at module level; images are read with NibabelIO here\n")
    check(site)
    print(f"installed {len(todo)} of {len(names)} distributions from {wheel_dir} into {site} "
          f"({len(names) - len(todo)} were here already)")
    return todo


def _missing_simpleitk() -> bool:
    try:
        metadata.distribution("simpleitk")
        return False
    except metadata.PackageNotFoundError:
        return True


def check(site: str | None = None) -> None:
    """Raise naming every requirement of the project that is missing or at a version that does not satisfy it."""
    if site is not None and site not in sys.path:
        sys.path.insert(0, site)
    import importlib

    importlib.invalidate_caches()  # distributions installed into ``site`` by this process count
    problems = []
    for name, info in requirement_closure(project_requirements(), skip=NOT_CARRIED).items():
        if name in NOT_CARRIED:
            continue
        if info["version"] is None:
            problems.append(f"{name}{info['wanted']} (needed by {info['by']}) is missing")
        elif not info["satisfied"]:
            problems.append(f"{name} {info['version']} is installed but {info['by']} needs {name}{info['wanted']}")
    if problems:
        raise OfflineError("the wheel folder does not complete this environment: " + "; ".join(problems)
                           + ". Add it with scripts/build_wheels.sh --include NAME on a machine with a package index.")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="download or build the wheels (needs a package index)")
    b.add_argument("wheel_dir")
    b.add_argument("--python", nargs="+", default=["3.12", f"{sys.version_info.major}.{sys.version_info.minor}"],
                   help="Python versions of the binary wheels (default: 3.12 and this one)")
    b.add_argument("--include", nargs="*", default=[],
                   help="also carry these, though a torch machine has them (e.g. a version it lacks)")
    i = sub.add_parser("install", help="install the missing wheels into SITE and check the environment (offline)")
    i.add_argument("wheel_dir")
    i.add_argument("site")
    args = parser.parse_args(argv)
    try:
        if args.command == "build":
            build(args.wheel_dir, list(dict.fromkeys(args.python)), args.include)
        else:
            install(args.wheel_dir, args.site)
    except (OfflineError, subprocess.CalledProcessError) as e:
        print(f"offline: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
