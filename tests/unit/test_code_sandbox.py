"""Code verifier: extraction, output comparison, and containment of hostile programs."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from self_revision_training.shared.problems import TestCase
from self_revision_training.shared.rewards.code_tests import (
    SandboxLimits,
    extract_code,
    grade_code,
    grade_code_batch,
    outputs_match,
    sandbox_capabilities,
)

ADD_TESTS = [TestCase("1 2\n", "3\n"), TestCase("5 7\n", "12")]


def py(code: str) -> str:
    return f"Here is my solution.\n```python\n{code}\n```\n"


def test_extract_code_picks_last_supported_block():
    text = "```python\nprint(1)\n```\n<think>```cpp\nint x;\n```</think>\n```text\nnot code\n```\n```py\nprint(2)\n```"
    assert extract_code(text) == ("python", "print(2)\n")
    assert extract_code("```cpp\nint main(){}\n```") == ("cpp", "int main(){}\n")
    assert extract_code("```\nprint(3)\n```") == ("python", "print(3)\n")
    assert extract_code("no code at all") is None
    assert extract_code("```java\nclass A{}\n```") is None


def test_outputs_match_normalises_whitespace():
    assert outputs_match("1 2\n3\n", "1  2\r\n3")
    assert outputs_match("3\n", "3")
    assert not outputs_match("1 2", "12")
    assert not outputs_match("3", "")


def test_correct_and_wrong_python():
    assert grade_code(py("a, b = map(int, input().split())\nprint(a + b)"), ADD_TESTS).correct
    result = grade_code(py("print(0)"), ADD_TESTS)
    assert (result.correct, result.reason, result.passed) == (False, "wrong_answer", 0)
    result = grade_code(py("a, b = map(int, input().split())\nprint(3)"), ADD_TESTS)
    assert (result.reason, result.passed, result.total) == ("wrong_answer", 1, 2)


def test_cpp_when_gxx_exists():
    if not sandbox_capabilities()["gxx"]:
        pytest.skip("g++ not installed")
    code = "```cpp\n#include <iostream>\nint main(){long a,b;std::cin>>a>>b;std::cout<<a+b<<'\\n';}\n```"
    assert grade_code(code, ADD_TESTS).correct
    broken = grade_code("```cpp\nint main( {\n```", ADD_TESTS)
    assert (broken.correct, broken.reason) == (False, "compile_error")


def test_no_code_and_no_tests():
    assert grade_code("I don't know", ADD_TESTS).reason == "no_code"
    assert grade_code(py("print(1)"), []).reason == "no_tests"


def test_infinite_loop_and_sleep_are_killed():
    limits = SandboxLimits(time_limit_s=1.0)
    for code in ("while True:\n    pass", "import time\ntime.sleep(1000)"):
        start = time.monotonic()
        result = grade_code(py(code), ADD_TESTS, limits)
        assert (result.correct, result.reason) == (False, "timeout")
        assert time.monotonic() - start < 5


def test_fork_bomb_is_contained():
    code = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
    start = time.monotonic()
    result = grade_code(py(code), ADD_TESTS, SandboxLimits(time_limit_s=1.0))
    assert not result.correct and result.reason in ("timeout", "runtime_error")
    assert time.monotonic() - start < 10
    # The machine still works: a normal program runs right after.
    assert grade_code(py("a, b = map(int, input().split())\nprint(a + b)"), ADD_TESTS).correct


def test_memory_hog_is_contained():
    result = grade_code(
        py("x = []\nwhile True:\n    x.append(bytearray(10**7))"), ADD_TESTS, SandboxLimits(memory_mb=256)
    )
    assert not result.correct and result.reason == "runtime_error"
    assert "MemoryError" in result.detail


def test_huge_output_is_cut_by_the_file_size_limit():
    result = grade_code(py("while True:\n    print('x' * 1000)"), ADD_TESTS, SandboxLimits(file_size_mb=1))
    assert not result.correct and result.reason in ("runtime_error", "timeout")


def test_writing_outside_the_work_directory_is_contained(tmp_path: Path):
    target = tmp_path / "escaped.txt"
    home = Path.home() / "sdzero-sandbox-escape.txt"
    code = (
        f"open({str(target)!r}, 'w').write('x')\nopen({str(home)!r}, 'w').write('x')\n"
        "a, b = map(int, input().split())\nprint(a + b)"
    )
    result = grade_code(py(code), ADD_TESTS)
    assert not result.correct and result.reason == "runtime_error"
    assert not target.exists() and not home.exists()


def test_network_is_unreachable():
    caps = sandbox_capabilities()
    if not caps["net"]:
        pytest.skip(f"no network namespace here: {caps['notes']}")
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    try:
        code = (
            f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
            "a, b = map(int, input().split())\nprint(a + b)"
        )
        result = grade_code(py(code), ADD_TESTS)
    finally:
        server.close()
    assert not result.correct and result.reason == "runtime_error"


def test_capabilities_are_reported():
    caps = sandbox_capabilities()
    assert set(caps) >= {"net", "private_tmp", "pid", "uid_switch", "python", "gxx", "notes"}


def test_batch():
    responses = [py("a, b = map(int, input().split())\nprint(a + b)"), py("print(0)"), "nothing"]
    results = grade_code_batch(responses, [ADD_TESTS] * 3)
    assert [r.reason for r in results] == ["passed", "wrong_answer", "no_code"]
