"""The two writers: one self-contained HTML page (CJK and emoji fonts named, images embedded) and its Markdown twin."""
from __future__ import annotations

import base64
import html
import mimetypes
from pathlib import Path

from .document import Section

# Noto CJK first (fonts-noto-cjk on Debian), then the usual CJK system fonts of macOS and Windows; then the colour
# emoji fonts (fonts-noto-color-emoji on Debian), so an emoji in a name is drawn, not a box.
EMOJI_FONTS = '"Noto Color Emoji", "Apple Color Emoji", "Segoe UI Emoji"'
FONT_STACK = ('"Noto Sans CJK SC", "Noto Sans SC", "Source Han Sans SC", "WenQuanYi Micro Hei", '
              f'"PingFang SC", "Microsoft YaHei", {EMOJI_FONTS}, sans-serif')
CSS = """
body { font-family: %s; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; line-height: 1.5; }
h1 { border-bottom: 2px solid #345; padding-bottom: .3em; }
h2 { margin-top: 2em; color: #234; border-bottom: 1px solid #ccd; }
table { border-collapse: collapse; margin: .8em 0; font-size: 14px; }
th, td { border: 1px solid #ccd; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #eef1f6; }
img { max-width: 100%%; border: 1px solid #ddd; }
.not-run { color: #a33; font-style: italic; }
.pass { color: #161; font-weight: bold; } .fail { color: #a11; font-weight: bold; }
.meta { color: #667; font-size: 13px; }
.stale { color: #8a5a00; background: #fff6dd; padding: 4px 8px; font-weight: bold; }
pre { font-family: "Noto Sans Mono CJK SC", %s, monospace; background: #f6f7f9; padding: 8px; white-space: pre-wrap; }
details summary { cursor: pointer; color: #345; }
""" % (FONT_STACK, FONT_STACK)


def _data_uri(path: Path) -> str:
    mime = mimetypes.guess_type(path.name)[0] or "image/png"
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"


def _html_block(block) -> str:
    e = html.escape
    if block[0] == "p":
        return f"<p>{e(block[1])}</p>"
    if block[0] == "table":
        head = "".join(f"<th>{e(h)}</th>" for h in block[1])
        head = f"<thead><tr>{head}</tr></thead>" if any(block[1]) else ""  # a key/value table needs no header
        body = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in block[2])
        return f"<table>{head}<tbody>{body}</tbody></table>"
    if block[0] == "pre":
        return f"<pre>{e(block[1])}</pre>"
    return f'<img src="{_data_uri(block[1])}" alt="{e(block[2])}">'


def render_html(title: str, meta: str, secs: list[Section]) -> str:
    e = html.escape
    toc = "".join(f'<li><a href="#{s.key}">{e(s.title)}</a>{"" if s.ran else " (not run)"}'
                  f'{" (from an older run)" if s.stale else ""}</li>' for s in secs)

    def content(s: Section) -> str:
        inner = "".join(_html_block(b) if s.ran else f'<p class="not-run">{e(b[1])}</p>' for b in s.blocks)
        return f"<details><summary>Show {e(s.title.lower())}</summary>{inner}</details>" if s.collapsed else inner

    body = "".join(
        f'<section id="{s.key}" class="{"ran" if s.ran else "not-run-section"}{" stale-section" if s.stale else ""}">'
        f'<h2>{e(s.title)}</h2>' + (f'<p class="stale">{e(s.stale)}</p>' if s.stale else "") + content(s) + "</section>"
        for s in secs)
    return (f'<!DOCTYPE html>\n<html lang="zh-CN"><head><meta charset="utf-8"><title>{e(title)}</title>'
            f"<style>{CSS}</style></head><body><h1>{e(title)}</h1><p class=\"meta\">{e(meta)}</p>"
            f"<ul>{toc}</ul>{body}</body></html>\n")


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", "<br>")


def render_markdown(title: str, meta: str, secs: list[Section], image_names: dict[Path, str]) -> str:
    out = [f"# {title}", "", meta, ""]
    for s in secs:
        out += [f"## {s.title}", ""] + ([f"**{s.stale}**", ""] if s.stale else [])
        out += [f"<details><summary>Show {s.title.lower()}</summary>", ""] if s.collapsed else []
        for b in s.blocks:
            if b[0] == "p":
                out += [f"*{b[1]}*" if not s.ran else b[1], ""]
            elif b[0] == "table":
                out += ["| " + " | ".join(_md_cell(h) for h in b[1]) + " |", "|" + "---|" * len(b[1])]
                out += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in b[2]] + [""]
            elif b[0] == "pre":
                out += ["```text", b[1].rstrip("\n"), "```", ""]
            else:
                out += [f"![{b[2]}]({image_names[b[1]]})", ""]
        out += ["</details>", ""] if s.collapsed else []
    return "\n".join(out)
