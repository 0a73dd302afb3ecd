"""Packaging for facecl: everything is read from settings.ini (the nbdev 2 convention)."""
from configparser import ConfigParser
from setuptools import find_packages, setup

cfg = ConfigParser(delimiters=["="])
cfg.read("settings.ini", encoding="utf-8")
c = cfg["DEFAULT"]
reqs = c.get("requirements", "").split()
dev = c.get("dev_requirements", "").split()
scripts = [s.strip() for s in c.get("console_scripts", "").split() if s.strip()]

setup(
    name=c["lib_name"],
    version=c["version"],
    description=c["description"],
    author=c["author"],
    license="Apache-2.0",
    python_requires=">=" + c["min_python"],
    packages=find_packages(include=[c["lib_path"], c["lib_path"] + ".*"]),
    include_package_data=True,
    package_data={c["lib_path"]: ["assets/*"]},
    install_requires=reqs,
    extras_require={"dev": dev},
    entry_points={"console_scripts": scripts, "nbdev": [f'{c["lib_path"]}={c["lib_path"]}._modidx:d']},
    zip_safe=False,
)
