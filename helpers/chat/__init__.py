"""Chatting with a model (notebook 04, the terminal, the web demo).

- session.py  a model (full, or base + adapter) and one conversation: the reply streamed, the turns kept
- compare.py  the course's models loaded once; before/after answers side by side; the identity leaking
- widget.py   the notebook's chat widget
- cli.py      `python -m helpers chat` (XTuner's --prompt-template spelling checked) and `python -m helpers web`
"""
from __future__ import annotations

from ..chat_defaults import CHAT_DEFAULTS_FILE, trained_system_prompt, write_chat_defaults
from ..terminal import run_cli
from .cli import (PROMPT_TEMPLATES, _default_model_dir, add_command, check_prompt_template, web_command,
                  web_demo_transcript)
from .compare import (LEAK_RUN, CourseModels, before_after, general_questions, leaks_identity, load_course_models,
                      overfitting_check)
from .session import ChatError, ChatSession, GenerationSettings, load_chat_model, stream_reply
from .widget import ChatWidget, chat_widget

__all__ = ["CHAT_DEFAULTS_FILE", "trained_system_prompt", "write_chat_defaults", "run_cli", "PROMPT_TEMPLATES",
           "_default_model_dir", "add_command", "check_prompt_template", "web_command", "web_demo_transcript",
           "LEAK_RUN", "CourseModels", "before_after", "general_questions", "leaks_identity", "load_course_models",
           "overfitting_check", "ChatError", "ChatSession", "GenerationSettings", "load_chat_model", "stream_reply",
           "ChatWidget", "chat_widget"]
