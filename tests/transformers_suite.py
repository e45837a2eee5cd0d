"""transformers' own common test mixins (`ModelTesterMixin`, `ConfigTester`, `ProcessorTesterMixin`,
`ImageProcessingTestMixin`), taken from the source distribution of the installed transformers release.

The wheel ships no tests; the source distribution on PyPI ships `tests/test_*_common.py`. It is downloaded with
pip once per version and kept in a cache folder (`PVC_TRANSFORMERS_TESTS`, default
`~/.cache/pvc/transformers-tests`). Three modules those files import are not in the source distribution:
`generation/test_utils.py` (`GenerationTesterMixin`), `exporters/test_export.py` (`ExportTesterMixin`) and
`utils/test_configuration_utils.py`; `STAND_INS` below replaces them, so the generation mixin does not run here
(PVC's generation is tested in test_modeling.py against direct forward passes).
"""

import importlib
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import pytest
import transformers

PACKAGE = "hf_common_tests"
# Modules the common test files import that the source distribution leaves out.
STAND_INS = {
    "generation/test_utils.py": '''"""Stand-in: the source distribution has no tests/generation/."""


class GenerationTesterMixin:
    pass
''',
    "exporters/test_export.py": '''"""Stand-in: the source distribution has no tests/exporters/."""


class ExportTesterMixin:
    pass
''',
    # ConfigTester's check that every PretrainedConfig-wide option can be set and read back.
    "utils/test_configuration_utils.py": '''"""Stand-in: the source distribution has no tests/utils/."""

config_common_kwargs = {
    "return_dict": False,
    "output_hidden_states": True,
    "output_attentions": True,
    "dtype": "float16",
    "chunk_size_feed_forward": 5,
    "architectures": ["BertModel"],
    "id2label": {0: "label"},
    "label2id": {"label": "0"},
    "problem_type": "regression",
    "tokenizer_class": "BertTokenizerFast",
    "prefix": "prefix",
    "bos_token_id": 6,
    "pad_token_id": 7,
    "eos_token_id": 8,
    "sep_token_id": 9,
    "decoder_start_token_id": 10,
    "task_specific_params": {"translation": "some_params"},
}
''',
}


# `utils/fetch_hub_objects_for_ci.py` of transformers' repository maps the Hub URLs of its test media to local copies
# fetched beforehand. The stand-in makes local media instead (nothing is downloaded): a picture for an image URL, a
# short video for a video URL, named after the URL's file.
MEDIA_STAND_IN = '''"""Stand-in for transformers' utils/fetch_hub_objects_for_ci.py: local media made here, named after each URL."""

import os
from pathlib import Path

MEDIA = Path(__file__).resolve().parent / "media"


def url_to_local_path(url, return_url_if_not_found=True):
    name = os.path.basename(str(url).split("?")[0])
    path = MEDIA / name
    if path.exists():
        return str(path)
    MEDIA.mkdir(exist_ok=True)
    suffix = path.suffix.lower()
    if suffix in (".png", ".jpg", ".jpeg", ".webp", ".bmp"):
        import numpy as np
        from PIL import Image

        y, x = np.mgrid[0:480, 0:640]
        picture = np.stack([x * 255 // 640, y * 255 // 480, (x + y) % 256], -1).astype(np.uint8)
        Image.fromarray(picture).save(path)
    elif suffix in (".mp4", ".avi", ".mov", ".mkv", ".webm"):
        import av
        import numpy as np

        partial = path.with_name("partial-" + name)
        with av.open(str(partial), "w", format="mp4") as container:
            stream = container.add_stream("mpeg4", rate=10)
            stream.width, stream.height, stream.pix_fmt = 320, 240, "yuv420p"
            for index in range(30):
                frame = np.zeros((240, 320, 3), np.uint8)
                frame[:, (index * 10) % 320 : (index * 10) % 320 + 10] = 255
                for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        partial.rename(path)
    else:
        return str(url) if return_url_if_not_found else None
    return str(path)
'''


def cache_root() -> Path:
    default = Path.home() / ".cache" / "pvc" / "transformers-tests"
    return Path(os.environ.get("PVC_TRANSFORMERS_TESTS", default)) / transformers.__version__


def fetch(root: Path) -> Path:
    """`root/hf_common_tests`: the release's `tests/*.py` as a package, plus the stand-ins. Written into a temporary
    folder and renamed into place, so an interrupted download leaves nothing half-written."""
    package = root / PACKAGE
    if (package / "__init__.py").exists():
        return package
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root) as scratch:
        command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:"]
        command += ["--disable-pip-version-check", f"transformers=={transformers.__version__}", "-d", scratch]
        subprocess.run(command, check=True, capture_output=True, timeout=600)
        (archive,) = Path(scratch).glob("transformers-*.tar.gz")
        staging = Path(scratch) / PACKAGE
        staging.mkdir()
        with tarfile.open(archive) as tar:
            for member in tar.getmembers():
                parts = Path(member.name).parts
                if len(parts) == 3 and parts[1] == "tests" and parts[2].endswith(".py") and member.isfile():
                    (staging / parts[2]).write_bytes(tar.extractfile(member).read())
        for name, text in STAND_INS.items():
            path = staging / name
            path.parent.mkdir(parents=True, exist_ok=True)
            (path.parent / "__init__.py").touch()
            path.write_text(text)
        (staging / "__init__.py").touch()
        utils = root / "utils"  # beside the package, where the common tests look for it
        utils.mkdir(exist_ok=True)
        (utils / "fetch_hub_objects_for_ci.py").write_text(MEDIA_STAND_IN)
        if not package.exists():
            staging.rename(package)
    return package


def load(name: str):
    """Module `name` (e.g. "test_modeling_common") of the installed release's common tests, or a skip saying why
    it cannot be had."""
    try:
        package = fetch(cache_root())
    except (OSError, subprocess.SubprocessError, ValueError) as error:
        detail = getattr(error, "stderr", b"") or b""
        reason = detail.decode(errors="replace").strip().splitlines()[-1:] or [str(error)]
        pytest.skip(
            f"transformers {transformers.__version__}'s common tests could not be fetched from PyPI "
            f"({reason[0]}); set PVC_TRANSFORMERS_TESTS to a folder that holds them.",
            allow_module_level=True,
        )
    if str(package.parent) not in sys.path:
        sys.path.insert(0, str(package.parent))
    try:
        return importlib.import_module(f"{PACKAGE}.{name}")
    except ImportError as error:
        pytest.skip(f"transformers' {name} cannot be imported here: {error}", allow_module_level=True)
