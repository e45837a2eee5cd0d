"""`pvc-serve PATH [vLLM options]`: vLLM's OpenAI-compatible server for a PVC checkpoint.

The same as `python -m vllm.entrypoints.openai.api_server --model PATH` plus the options of `pvc.serving`
(`--trust-remote-code --model-impl transformers --hf-overrides ... --mm-processor-kwargs ...`); every other
option goes to vLLM unchanged (`--dtype bfloat16`, `--tensor-parallel-size 2`, `--port 8000`,
`--limit-mm-per-prompt '{"image": 4, "video": 1}'`, ...). vLLM is installed separately (`pip install vllm`).
"""

import importlib.util
import os
import sys

from . import server_arguments

USAGE = "usage: pvc-serve PATH [vLLM server options]   (pvc-serve --help for vLLM's own options)"


def command(argv: list[str]) -> list[str]:
    """The vLLM server command line for `pvc-serve ARGV`."""
    path, *rest = argv
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", path, *server_arguments(), *rest]


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
    arguments = command(argv)
    print("pvc-serve:", " ".join(arguments[1:]), file=sys.stderr, flush=True)
    os.execv(sys.executable, arguments)  # the server replaces this process: signals and exit status are vLLM's


if __name__ == "__main__":
    sys.exit(main())
