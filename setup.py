"""Maps the top-level folders onto one import namespace, ``adapterctl.*``.

pyproject.toml holds the metadata; this file only computes the package list so
new subpackages are picked up without editing a hand-kept list.
"""
from setuptools import find_packages, setup

ROOTS = {
    "adapterctl": "core",
    "adapterctl.v1": "proto/adapterctl/v1",
    "adapterctl.registry": "registry",
    "adapterctl.trainer": "trainer",
    "adapterctl.server": "server",
    "adapterctl.client": "client",
}

packages: list[str] = []
package_dir: dict[str, str] = {}
for pkg, folder in ROOTS.items():
    package_dir[pkg] = folder
    packages.append(pkg)
    for sub in find_packages(folder):
        packages.append(f"{pkg}.{sub}")
        package_dir[f"{pkg}.{sub}"] = f"{folder}/{sub.replace('.', '/')}"

# The chat template, and the C sources of the CPU kernels (compiled on first use, server/engine/cpu_build.py).
DATA = {"adapterctl": ["templates/*.jinja"], "adapterctl.server.engine": ["*.c", "*.h"]}
setup(packages=packages, package_dir=package_dir, package_data=DATA)
