"""The terminal chat's loop, one for the text chat and the picture chat: read a line, stream the answer."""
from __future__ import annotations

import sys

RESET, EXIT = "RESET", "EXIT"  # the terminal chat's commands, as in the course's chat tool


def run_cli(session, stdin=None, stdout=None, about: str = "") -> int:
    """Read a line, stream the answer; RESET starts over, EXIT (or end of input) quits.

    `session` is anything with `send(text)` yielding the reply's pieces, `history` and `reset()`
    (a ChatSession, or the picture chat's VlmChat). Input that is not typed at a terminal (a pipe, a script)
    is echoed after the prompt, so that the transcript reads as the conversation did."""
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    echo = not (hasattr(stdin, "isatty") and stdin.isatty())
    print(f"Chat{about} started. Type {RESET} to clear the history, {EXIT} to quit.", file=stdout, flush=True)
    while True:
        print("\n用户 >>> ", end="", file=stdout, flush=True)
        line = stdin.readline()
        if echo and line:
            print(line.rstrip("\n"), file=stdout, flush=True)
        if not line or line.strip() == EXIT:
            print("\nbye", file=stdout, flush=True)
            return 0
        text = line.strip()
        if not text:
            continue
        if text == RESET:
            turns = len(session.history) // 2
            session.reset()
            print(f"(history cleared: {turns} turns forgotten)", file=stdout, flush=True)
            continue
        print("助手 >>> ", end="", file=stdout, flush=True)
        try:
            for piece in session.send(text):
                print(piece, end="", file=stdout, flush=True)
        except Exception as e:  # one sentence, and the chat goes on: the session kept no half turn
            print(f"\nerror: {generation_problem(e)}", file=stdout, flush=True)
            continue
        print(file=stdout, flush=True)
        if getattr(session, "dropped", 0):
            print(f"(the {session.dropped} oldest turns no longer fit the model's context and were left out; "
                  f"{RESET} starts over)", file=stdout, flush=True)


def generation_problem(error: BaseException) -> str:
    """One sentence for a failed answer: what went wrong, and that the turn was left out of the conversation."""
    said = (str(error).strip().splitlines() or [""])[0][:200]
    return (f"The model could not answer ({type(error).__name__}{': ' + said if said else ''}); the question was "
            "not added to the conversation: try again, with fewer max new tokens, or reset the conversation.")


def terminal_transcript(model_dir, lines: list[str], *options: str) -> str:
    """Run the terminal chat (`python -m helpers chat MODEL_DIR OPTIONS`) with `lines` typed in, then EXIT, and
    return what the terminal showed: the command, then the conversation (a notebook cannot type into a terminal)."""
    import os
    import shlex
    import subprocess
    from pathlib import Path

    command = [sys.executable, "-m", "helpers", "chat", str(Path(model_dir).resolve()), *map(str, options)]
    typed = "".join(f"{line}\n" for line in lines) + f"{EXIT}\n"
    done = subprocess.run(command, input=typed, capture_output=True, text=True, encoding="utf-8",
                          env=dict(os.environ, PYTHONIOENCODING="utf-8"), cwd=Path(__file__).resolve().parent.parent)
    if done.returncode != 0:
        said = (done.stderr.strip().splitlines() or ["no message"])[-1]
        raise RuntimeError(f"the terminal chat stopped with exit code {done.returncode}: {said}")
    shown = shlex.join(["python", "-m", "helpers", "chat", str(model_dir), *map(str, options)])
    return f"$ {shown}\n{done.stdout.rstrip()}\n"
