"""What pyproject.toml cannot say: the repository's ``configs/`` tree ships inside the distribution as the package
``mtlib_configs`` (every Hydra main composes from ``pkg://mtlib_configs``, see ``mtl.config.CONFIG_PATH``), so an installed
wheel finds its configs from any working directory while ``configs/`` stays the one source."""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["mtl*", "mtrec*", "mtrl*", "serving*"]), "mtlib_configs"],
    package_dir={"mtlib_configs": "configs"},
    package_data={
        "": ["py.typed"],
        "mtrl": ["data/*.json"],
        "mtrec": ["data/schemas/*.yaml"],  # the built-in schemas of the files path (census, aliexpress)
        "mtlib_configs": ["*.yaml", "*/*.yaml", "*/*/*.yaml"],
    },
)
