"""`torchrun --nproc-per-node 2 -m dsv3.cli serve --tp 2` on CPU gloo is one OpenAI endpoint: the official
`openai` client gets the same greedy completion as one process's `LLM` on the whole model (the oracle)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import openai
import torch

import dsv3
from dsv3.engine import LLM, SamplingParams
from test_serve_support import ROOT, free_port, wait_healthy

PROMPT = "The history of the"


def test_torchrun_serve_answers_the_openai_client():
    model = dsv3.default_model_path()  # a small trained model with its tokenizer; 8 heads, vocab 8192
    port = free_port()
    log = tempfile.NamedTemporaryFile(prefix="dsv3-tp-serve-", suffix=".log", delete=False)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
           "-m", "dsv3.cli", "serve", "--model", str(model), "--port", str(port), "--device", "cpu",
           "--dtype", "float32", "--tp", "2", "--num-blocks", "64", "--log-level", "warning"]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1", "DSV3_DIST_TIMEOUT": "120"}
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        try:
            wait_healthy(url, proc=proc)
        except Exception:
            raise RuntimeError(f"server failed to start:\n{Path(log.name).read_text()[-3000:]}") from None
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
        name = client.models.list().data[0].id
        served = client.completions.create(model=name, prompt=PROMPT, max_tokens=8, temperature=0)
        chat = client.chat.completions.create(model=name, messages=[{"role": "user", "content": "Hello"}],
                                              max_tokens=4, temperature=0)
        assert chat.choices[0].message.content
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # torchrun and both ranks
        proc.wait(60)
    torch.set_num_threads(1)
    llm = LLM(str(model), device="cpu", dtype="float32", num_blocks=64)
    local = llm.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=8), use_tqdm=False)[0]
    assert served.choices[0].text == local.text
    assert served.usage.completion_tokens == len(local.token_ids)
