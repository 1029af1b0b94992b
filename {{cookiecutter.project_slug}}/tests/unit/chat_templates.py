"""Chat templates for the unit tests' tiny tokenizers."""


def jinja(text: str) -> str:
    """Spell Jinja markers as <% %> and << >> so that no rendered file holds a raw marker."""
    marks = {"<%": "{" + "%", "%>": "%" + "}", "<<": "{" + "{", ">>": "}" + "}"}
    for mark, real in marks.items():
        text = text.replace(mark, real)
    return text


CHATML = jinja(
    "<% for m in messages %><|im_start|><< m['role'] >>\n<< m['content'] >><|im_end|>\n<% endfor %>"
    "<% if add_generation_prompt %><|im_start|>assistant\n<% endif %>"
)
