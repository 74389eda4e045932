"""`lmdepot generate` and `lmdepot chat` (through a pseudo-terminal), checked against the Python API."""

import os
import re
import subprocess
import sys

import pytest

from lmdepot.runtime.llm import encode_prompt
from lmdepot.runtime.sequence import SamplingParams

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
GREEDY = ["--temperature", "0", "--max-new-tokens", "24", "--cache-max-entry-count", "0.05"]


def greedy_text(llm, messages, n=24):
    ids = encode_prompt(llm.tokenizer, messages, chat_template=True)
    return llm.generate(ids, SamplingParams(max_tokens=n, temperature=0)).text


def test_generate_prints_only_the_completion(smol_ws, smol_llm):
    r = subprocess.run([sys.executable, "-m", "lmdepot.cli", "generate", str(smol_ws), "--prompt",
                        "What is the capital of France?", *GREEDY], capture_output=True, text=True, env=ENV)
    assert r.returncode == 0, r.stderr
    assert r.stdout == greedy_text(smol_llm, [{"role": "user", "content": "What is the capital of France?"}]) + "\n"
    assert "KV cache:" in r.stderr and "tokens max" in r.stderr   # sizing is reported, on stderr


def test_generate_without_chat_template(smol_ws, smol_llm):
    r = subprocess.run([sys.executable, "-m", "lmdepot.cli", "generate", str(smol_ws), "--prompt", "Once upon a time",
                        "--no-chat-template", *GREEDY], capture_output=True, text=True, env=ENV)
    assert r.returncode == 0, r.stderr
    ids = smol_llm.tokenizer.encode("Once upon a time")
    assert r.stdout == smol_llm.generate(ids, SamplingParams(max_tokens=24, temperature=0)).text + "\n"


def test_chat_keeps_the_session_across_turns(smol_ws, smol_llm):
    pexpect = pytest.importorskip("pexpect")
    child = pexpect.spawn(sys.executable, ["-m", "lmdepot.cli", "chat", str(smol_ws), *GREEDY], env=ENV,
                          encoding="utf-8", timeout=120)
    prompt = "double enter to end input >>> "
    replies = []
    try:
        child.expect_exact(prompt)
        for turn in ("What is the capital of France?", "And what is the capital of Germany?"):
            child.sendline(turn)
            child.sendline("")
            child.expect_exact(prompt)
            # the pty echoes the input lines; the reply is what follows them
            out = child.before.replace("\r\n", "\n")
            replies.append(out.split(turn + "\n\n", 1)[1].strip("\n"))
        child.sendline("exit")
        child.sendline("")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    assert replies[0] == greedy_text(smol_llm, msgs)
    msgs += [{"role": "assistant", "content": replies[0]},
             {"role": "user", "content": "And what is the capital of Germany?"}]
    assert replies[1] == greedy_text(smol_llm, msgs)
    assert re.search(r"Berlin", replies[1])
