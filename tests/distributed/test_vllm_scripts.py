"""The Alliance Canada guide's two vLLM scripts with only the import swapped: the single-node
one (tensor_parallel_size=2 in one process: it spawns its second rank) and the multi-node one
(tensor_parallel_size=4 under mpirun -n 4, every rank printing) give the TP=1 outputs."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from hpcinfer.testing.require import require
from hpcinfer.testing.tiny import tiny_checkpoint

HERE = Path(__file__).resolve().parent
FAMILY = "llama3"  # 2 KV heads: replicated at TP=4


def _script_parts(name: str):
    """The prompts and sampling params the script uses, read from its own text."""
    text = (HERE / name).read_text()
    namespace: dict = {}
    block = text[text.index("prompts = ["):text.index("llm = LLM(")]
    exec("from hpcinfer import SamplingParams\n" + block, namespace)
    return namespace["prompts"], namespace["sampling_params"]


def _expected_lines(name: str, model: str) -> list[str]:
    from hpcinfer import LLM
    prompts, params = _script_parts(name)
    outputs = LLM(model=model, tensor_parallel_size=1, device="cpu").generate(
        prompts, params, use_tqdm=False)
    return [f"Prompt: {o.prompt!r}, Generated text: {o.outputs[0].text!r}" for o in outputs]


def _env(model: str) -> dict:
    return {**os.environ, "MODEL_PATH": model, "DEVICE": "cpu", "OMP_NUM_THREADS": "1",
            "TRITON_INTERPRET": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def _printed(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if re.match(r"Prompt: ", line)]


def test_single_node_script_spawns_its_ranks():
    model = str(tiny_checkpoint(FAMILY))
    want = _expected_lines("alliance_single_node.py", model)
    proc = subprocess.run([sys.executable, str(HERE / "alliance_single_node.py")],
                          env=_env(model), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _printed(proc.stdout) == want


def test_multi_node_script_under_mpirun(tmp_path):
    mpirun = shutil.which("mpirun")
    require(mpirun is not None, "mpirun (Open MPI) is not installed: run dev/setup.sh")
    model = str(tiny_checkpoint(FAMILY))
    want = _expected_lines("alliance_multi_node.py", model)
    # mpirun forwards the ranks' stdout in chunks, not lines, so lines of different ranks can
    # merge on its own stdout: have it write each rank's output to its own file instead.
    out_dir = tmp_path / "ranks"
    proc = subprocess.run([mpirun, "--allow-run-as-root", "--oversubscribe", "-n", "4",
                           "--output-filename", str(out_dir),
                           sys.executable, str(HERE / "alliance_multi_node.py")],
                          env=_env(model), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rank_files = sorted(out_dir.rglob("stdout"))
    assert len(rank_files) == 4, rank_files
    for path in rank_files:  # every rank prints every output, in order
        assert _printed(path.read_text()) == want, path
