"""Templates: which locales exist, and rendering them safely.

Layout: ``templates/<template_id>/<locale>/<part>.j2`` where template_id is the
notification type, the mail parts are ``subject``, ``text`` and optional ``html``, and
the push parts ``push_title``, ``push_body`` and optional ``push_image`` and
``push_link`` (these two fall back to ``en``: a URL rarely depends on the language),
``slack`` (Slack mrkdwn), ``sms`` (plain text) and ``inapp_title``/``inapp_body``.
Every template is compiled once, when the catalog is built (a syntax error stops
start-up, not a delivery). Rendering runs in Jinja2's immutable sandbox with strict
undefined variables; only ``html`` is autoescaped (escaping a plain-text body would
show ``&amp;`` to readers), and every value put into ``slack`` has Slack's control
characters escaped (``&``, ``<``, ``>``), so a variable can neither mention
``<!channel>`` nor make a link; the template's own text may. The subject is folded to
one line, so no variable can start a new header.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from pipeline.errors import ConfigurationError, RenderError
from pipeline.values import value_class

DEFAULT_LOCALE = "en"
SUFFIX = ".j2"


@value_class
class RenderedMail:
    """One mail's text, ready for MIME."""

    subject: str
    """One line."""
    text: str
    """Plain-text body."""
    html: str | None
    """HTML body, when the template has one."""
    locale: str
    """The locale actually rendered."""
    locale_fallback: bool
    """True when ``en`` stood in for a locale without templates."""


@value_class
class RenderedPush:
    """One push's display texts."""

    title: str
    """One line."""
    body: str
    """The message text."""
    image_url: str | None
    """An https URL, when the type has an image template."""
    link: str | None
    """An absolute URL (https or an app scheme), when the type has a link template."""
    locale: str
    """The locale actually rendered."""
    locale_fallback: bool
    """True when ``en`` stood in for a locale without templates."""


#: Schemes a push link may not use: they run code or read files on the device.
_UNSAFE_SCHEMES = frozenset({"javascript", "data", "file", "vbscript", "about", "blob"})


def _checked_url(url: str, part: str, *, https_only: bool) -> str:
    scheme = urlsplit(url).scheme.lower()
    if not url or any(c.isspace() or ord(c) < 32 for c in url) or not scheme:
        raise RenderError(f"{part} is not an absolute URL: {url[:200]!r}", reason="invalid_url")
    if scheme in _UNSAFE_SCHEMES or (https_only and scheme != "https"):
        raise RenderError(f"{part} may not use the {scheme!r} scheme", reason="invalid_url")
    return url


def slack_escaped(value: Any) -> str:
    """``value`` as text Slack shows as written (its mrkdwn control characters escaped)."""
    text = "" if value is None else str(value)
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _environment(autoescape: bool, slack: bool = False) -> ImmutableSandboxedEnvironment:
    return ImmutableSandboxedEnvironment(
        undefined=jinja2.StrictUndefined,
        autoescape=autoescape,
        # finalize runs on every {{ expression }}, never on the template's own text.
        finalize=slack_escaped if slack else None,
        auto_reload=False,
        trim_blocks=True,
        lstrip_blocks=True,
    )


class TemplateCatalog:
    """Every template under ``templates_dir``, compiled once.

    Each template (all locales and parts of one template id) has a version: the first
    12 hex digits of the sha256 of its files. Routes record the version they rendered,
    and the template archive (pipeline.views.TemplateArchive) keeps every version's
    files, so a resend can render what the original rendered (:meth:`of_files`).
    """

    def __init__(self, templates_dir: Path | None) -> None:
        sources: dict[str, dict[str, str]] = {}
        locales: dict[str, set[str]] = {}
        if templates_dir is not None and templates_dir.is_dir():
            for template_dir in sorted(p for p in templates_dir.iterdir() if p.is_dir()):
                files = sources.setdefault(template_dir.name, {})
                for locale_dir in sorted(p for p in template_dir.iterdir() if p.is_dir()):
                    locales.setdefault(template_dir.name, set()).add(locale_dir.name.lower())
                    for path in sorted(locale_dir.glob(f"*{SUFFIX}")):
                        name = f"{locale_dir.name.lower()}/{path.name.removesuffix(SUFFIX)}"
                        try:
                            files[name] = path.read_text(encoding="utf-8")
                        except (OSError, UnicodeDecodeError) as exc:
                            raise ConfigurationError(f"template {path}: {exc}") from exc
        self._load(sources, locales)

    @classmethod
    def of_files(cls, template_id: str, files: Mapping[str, str]) -> TemplateCatalog:
        """A catalog of one template from its files (``<locale>/<part>`` -> text), as the
        archive keeps them."""
        catalog = cls.__new__(cls)
        catalog._load({template_id: dict(files)})
        return catalog

    def _load(
        self,
        sources: Mapping[str, Mapping[str, str]],
        locales: Mapping[str, set[str]] | None = None,
    ) -> None:
        self._text_env = _environment(autoescape=False)
        self._html_env = _environment(autoescape=True)
        self._slack_env = _environment(autoescape=False, slack=True)
        self._templates: dict[tuple[str, str, str], jinja2.Template] = {}
        self._locales: dict[str, frozenset[str]] = {}
        self._files = {template_id: dict(files) for template_id, files in sources.items()}
        self._versions: dict[str, str] = {}
        for template_id, files in self._files.items():
            found = set((locales or {}).get(template_id, ()))  # a locale folder may be empty
            for name, text in files.items():
                locale, _, part = name.partition("/")
                found.add(locale)
                self._templates[(template_id, locale, part)] = self._compile(
                    f"{template_id}/{name}{SUFFIX}", text, part
                )
            self._locales[template_id] = frozenset(found)
            digest = hashlib.sha256(json.dumps(files, sort_keys=True).encode("utf-8"))
            self._versions[template_id] = digest.hexdigest()[:12]

    def version(self, template_id: str) -> str | None:
        """The version of ``template_id`` this catalog renders (None: no such template)."""
        return self._versions.get(template_id)

    def files(self, template_id: str) -> dict[str, str]:
        """The files of ``template_id``: ``<locale>/<part>`` -> text."""
        return dict(self._files.get(template_id, {}))

    def _compile(self, where: str, text: str, part: str) -> jinja2.Template:
        env = {"html": self._html_env, "slack": self._slack_env}.get(part, self._text_env)
        try:
            template = env.from_string(text)
        except jinja2.TemplateSyntaxError as exc:
            raise ConfigurationError(f"template {where}: {exc}") from exc
        # Jinja keeps a template's globals as a ChainMap over the environment's and
        # copies them into every render's context: iterating a ChainMap was a third of
        # the cost of rendering a push. Neither changes after start-up.
        template.globals = dict(template.globals)
        return template

    def template_ids(self) -> list[str]:
        """Every template id found."""
        return sorted(self._locales)

    def has(self, template_id: str, locale: str, part: str) -> bool:
        """Whether ``<template_id>/<locale>/<part>.j2`` exists."""
        return (template_id, locale, part) in self._templates

    def resolve(self, template_id: str, preferred: str | None) -> tuple[str, bool]:
        """(locale, fell_back): the preferred language if templates exist for it (also by
        its base language, pt-BR -> pt), else en."""
        available = self._locales.get(template_id, frozenset({DEFAULT_LOCALE}))
        if preferred:
            wanted = preferred.replace("_", "-").lower()
            for candidate in (wanted, wanted.split("-")[0]):
                if candidate in available:
                    return candidate, False
            return DEFAULT_LOCALE, wanted.split("-")[0] != DEFAULT_LOCALE
        return DEFAULT_LOCALE, False

    def render_mail(
        self,
        template_id: str,
        locale: str,
        variables: Mapping[str, Any],
        required: Iterable[str] = (),
    ) -> RenderedMail:
        """Subject, text and html of one mail; RenderError when that is not possible."""
        _check_required(template_id, variables, required)
        resolved, fell_back = self.resolve(template_id, locale)
        if not self.has(template_id, resolved, "subject"):
            raise RenderError(f"no mail template {template_id}/{resolved} (subject{SUFFIX})")
        subject = self._render(template_id, resolved, "subject", variables)
        text = self._render(template_id, resolved, "text", variables)
        html = None
        if self.has(template_id, resolved, "html"):
            html = self._render(template_id, resolved, "html", variables)
        return RenderedMail(
            subject=one_line(subject),
            text=text,
            html=html,
            locale=resolved,
            locale_fallback=fell_back or resolved != locale.lower(),
        )

    def render_push(
        self,
        template_id: str,
        locale: str,
        variables: Mapping[str, Any],
        required: Iterable[str] = (),
    ) -> RenderedPush:
        """Title, text, image and link of one push; RenderError when that is not possible
        (an image must be https, a link may not use a scheme that runs code)."""
        _check_required(template_id, variables, required)
        resolved, fell_back = self.resolve(template_id, locale)
        if not self.has(template_id, resolved, "push_title"):
            raise RenderError(f"no push template {template_id}/{resolved} (push_title{SUFFIX})")
        title = one_line(self._render(template_id, resolved, "push_title", variables))
        body = self._render(template_id, resolved, "push_body", variables).strip()
        urls: dict[str, str | None] = {}
        for part in ("push_image", "push_link"):
            where = resolved if self.has(template_id, resolved, part) else DEFAULT_LOCALE
            urls[part] = None
            if self.has(template_id, where, part):
                url = self._render(template_id, where, part, variables).strip()
                urls[part] = _checked_url(url, part, https_only=part == "push_image")
        return RenderedPush(
            title=title,
            body=body,
            image_url=urls["push_image"],
            link=urls["push_link"],
            locale=resolved,
            locale_fallback=fell_back or resolved != locale.lower(),
        )

    def render_text(
        self,
        template_id: str,
        part: str,
        locale: str,
        variables: Mapping[str, Any],
        required: Iterable[str] = (),
    ) -> tuple[str, str]:
        """(text, locale rendered) of a one-part message (``slack``, ``sms``), trimmed;
        RenderError when the type has no such template or it cannot be rendered."""
        _check_required(template_id, variables, required)
        resolved, _ = self.resolve(template_id, locale)
        if not self.has(template_id, resolved, part):
            if not self.has(template_id, DEFAULT_LOCALE, part):
                raise RenderError(f"no {part} template {template_id}/{resolved} ({part}{SUFFIX})")
            resolved = DEFAULT_LOCALE
        return self._render(template_id, resolved, part, variables).strip(), resolved

    def render_inapp(
        self,
        template_id: str,
        locale: str,
        variables: Mapping[str, Any],
        required: Iterable[str] = (),
    ) -> tuple[str, str, str]:
        """(title, body, locale) of an in-app entry: from ``inapp_title``/``inapp_body``,
        else the type's push texts, else its mail's subject and text."""
        for title_part, body_part in (
            ("inapp_title", "inapp_body"),
            ("push_title", "push_body"),
            ("subject", "text"),
        ):
            resolved, _ = self.resolve(template_id, locale)
            if self.has(template_id, resolved, title_part) or self.has(
                template_id, DEFAULT_LOCALE, title_part
            ):
                title, where = self.render_text(
                    template_id, title_part, locale, variables, required
                )
                body, _ = self.render_text(template_id, body_part, where, variables, required)
                return one_line(title), body, where
        raise RenderError(f"no in-app, push or mail template for {template_id}")

    def _render(
        self, template_id: str, locale: str, part: str, variables: Mapping[str, Any]
    ) -> str:
        template = self._templates.get((template_id, locale, part))
        if template is None:
            raise RenderError(f"no template {template_id}/{locale}/{part}{SUFFIX}")
        try:
            return template.render(variables)
        except jinja2.UndefinedError as exc:
            raise RenderError(f"{template_id}/{locale}/{part}: {exc.message}") from exc
        except jinja2.TemplateError as exc:  # sandbox violations included
            raise RenderError(f"{template_id}/{locale}/{part}: {exc}") from exc


def _check_required(
    template_id: str, variables: Mapping[str, Any], required: Iterable[str]
) -> None:
    missing = sorted(name for name in required if name not in variables)
    if missing:
        raise RenderError(f"{template_id}: missing required variables {missing}")


def variables_of(variables_json: str) -> dict[str, Any]:
    """A route's template variables; RenderError unless they are a JSON object."""
    try:
        variables = json.loads(variables_json or "{}")
    except ValueError as exc:
        raise RenderError(f"variables are not JSON: {exc}") from exc
    if not isinstance(variables, dict):
        raise RenderError("variables must be a JSON object")
    return variables


def one_line(text: str) -> str:
    """``text`` with every run of whitespace (line breaks included) folded to a space."""
    return " ".join(text.split())
