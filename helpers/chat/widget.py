"""The notebook's chat widget (ipywidgets): a transcript, a text box, Send / Reset and the settings."""
from __future__ import annotations


from ..terminal import generation_problem
from .session import ChatError, ChatSession, GenerationSettings


class ChatWidget:
    """An ipywidgets chat: a transcript, a text box, Send / Reset, and the generation settings."""

    def __init__(self, session: ChatSession):
        import ipywidgets as w

        self.session, self.error = session, None
        s = session.settings
        self.max_new_tokens = w.IntSlider(value=s.max_new_tokens, min=8, max=1024, step=8, description="max tokens")
        self.temperature = w.FloatSlider(value=s.temperature, min=0.0, max=1.5, step=0.05, description="temperature")
        self.top_p = w.FloatSlider(value=s.top_p, min=0.05, max=1.0, step=0.05, description="top-p")
        self.system = w.Text(value=session.system, description="system", layout=w.Layout(width="95%"))
        self.transcript = w.HTML(layout=w.Layout(border="1px solid #ccc", padding="6px", min_height="120px"))
        self.text = w.Text(placeholder="Type a message and press Enter", layout=w.Layout(width="70%"))
        self.send_button = w.Button(description="Send", button_style="primary")
        self.reset_button = w.Button(description="Reset")
        self.send_button.on_click(lambda _: self._send(self.text.value))
        self.reset_button.on_click(lambda _: self.reset())
        self.text.continuous_update = False
        self.text.observe(lambda change: self._send(change["new"]), names="value")
        self.ui = w.VBox([w.HBox([self.max_new_tokens, self.temperature, self.top_p]), self.system,
                          self.transcript, w.HBox([self.text, self.send_button, self.reset_button])])
        self._render()

    def _render(self, pending: str | None = None, partial: str = "") -> None:
        import html

        rows = [(m["role"], m["content"]) for m in self.session.history]
        if pending is not None:
            rows += [("user", pending), ("assistant", partial + " ▌")]
        note = (f"<p><i>({self.session.dropped} oldest turns left out: they no longer fit the model's context)</i></p>"
                if self.session.dropped else "")
        error = f'<p style="color:#b00020"><b>error:</b> {html.escape(self.error)}</p>' if self.error else ""
        self.transcript.value = (note + "".join(
            f"<p><b>{'你' if role == 'user' else '助手'}:</b> {html.escape(text)}</p>" for role, text in rows) or
            "<i>(no messages yet)</i>") + error

    def ask(self, text: str) -> str:
        """Send `text` as the Send button does (also callable from code), streaming into the transcript."""
        text = (text or "").strip()
        if not text:
            return ""
        self.text.value = ""
        self.session.system = self.system.value
        self.session.settings = GenerationSettings(self.max_new_tokens.value, self.temperature.value, self.top_p.value)
        partial, self.error = "", None
        try:
            for piece in self.session.send(text):
                partial += piece
                self._render(text, partial)
        except Exception as e:  # shown in the transcript; the session keeps no half turn
            self.error = generation_problem(e)
            self._render()
            raise ChatError(self.error) from None
        self._render()
        return self.session.history[-1]["content"]

    def _send(self, text: str) -> None:
        """What Send and Enter do: the error is already in the transcript, where the person looks."""
        try:
            self.ask(text)
        except ChatError:
            pass

    def reset(self) -> None:
        self.session.reset()
        self.error = None
        self._render()

    def _ipython_display_(self):
        from IPython.display import display

        display(self.ui)


def chat_widget(model, tokenizer, system: str = "", settings: GenerationSettings | None = None) -> ChatWidget:
    return ChatWidget(ChatSession(model, tokenizer, system, settings or GenerationSettings()))
