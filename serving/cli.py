"""`pvc-serve PATH [vLLM options]`: vLLM's OpenAI-compatible server for a PVC checkpoint.

The same as `python -m vllm.entrypoints.openai.api_server --model PATH` plus the options of `pvc.serving`
(`--trust-remote-code --model-impl transformers --hf-overrides ... --mm-processor-kwargs ...`); every other
option goes to vLLM unchanged (`--dtype bfloat16`, `--tensor-parallel-size 2`, `--port 8000`,
`--limit-mm-per-prompt '{"image": 4, "video": 1}'`, ...). vLLM is installed separately (`pip install vllm`).
"""

import importlib.util
import os
import sys

from ..conversion.options import CODE_FILES, missing_folder_message
from . import server_arguments

USAGE = "usage: pvc-serve PATH [vLLM server options]   (pvc-serve --help for vLLM's own options)"


def command(argv: list[str]) -> list[str]:
    """The vLLM server command line for `pvc-serve ARGV`."""
    path, *rest = argv
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", path, *server_arguments(rest)]


def code_problem(path: str) -> str | None:
    """A checkpoint folder whose code files predate serving (save_pretrained copies them into it) cannot be served:
    why, or None. Hub ids and folders without code files are left to vLLM."""
    code = os.path.join(path, "processing_pvc.py")
    if os.path.isfile(code) and "grid_layout" not in open(code, encoding="utf-8").read():
        files = " ".join(CODE_FILES)
        return (
            f"the code files in {path} predate serving with vLLM. Copy this repo's {files} into it (the weights "
            "and configs stay as they are), or convert the checkpoint again with pvc-convert."
        )
    return None


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        print(USAGE, file=sys.stderr)
        return 2
    if importlib.util.find_spec("vllm") is None:
        print("pvc-serve: error: vLLM is not installed in this environment: pip install vllm", file=sys.stderr)
        return 1
    if argv[0] in ("-h", "--help"):
        print(__doc__)
        os.execv(sys.executable, [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--help"])
    if problem := missing_folder_message(argv[0]) or code_problem(argv[0]):
        print(f"pvc-serve: error: {problem}", file=sys.stderr)
        return 1
    try:
        arguments = command(argv)
    except ValueError as error:
        print(f"pvc-serve: error: {error}", file=sys.stderr)
        return 2
    print("pvc-serve:", " ".join(arguments[1:]), file=sys.stderr, flush=True)
    os.execv(sys.executable, arguments)  # the server replaces this process: signals and exit status are vLLM's


if __name__ == "__main__":
    sys.exit(main())
