"""Moderation (the seed's 鉴黄鉴证): filters that every message passes before it is stored.

A filter provides :class:`imcluster.interfaces.IMessageFilter`: ``check(message)``
gets ``{"from", "sessionId", "clientMsgId", "body"}`` and returns a
:class:`Verdict` (or a Deferred firing with one):

``Verdict.accept()``
    the next filter sees the message;
``Verdict.reject(reason)``
    the sender gets ``message_reply`` ``ok:false`` code ``rejected`` with
    ``reason``; nothing is stored and the later filters do not run;
``Verdict.replace(body)``
    the message goes on with ``body`` instead (the next filters see it).

A message already stored (a client's retry) is never given to a filter,
except to one that declares ``pure = True`` (its only effect is its verdict,
as the keyword filter's): then a refusal of a stored message is replaced by
the original's reply. The moderation service
(:mod:`imcluster.processor.business`) is not pure.

Filters are configured by name, in order (``--filters keyword,...``). A name
without a dot is a Twisted plugin providing :class:`IMessageFilterFactory`
(``twisted/plugins/imcluster_filters.py`` provides ``keyword``); a dotted
name ``package.module.factory`` is a callable ``factory(config)`` returning a
filter. An unknown name is a :class:`imcluster.config.ConfigError` before the
daemon starts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from twisted.internet import defer
from twisted.logger import Logger
from twisted.plugin import IPlugin, getPlugins
from twisted.python.reflect import namedAny
from zope.interface import Attribute, Interface, implementer
from zope.interface.verify import verifyObject

from imcluster.config import ConfigError
from imcluster.interfaces import IMessageFilter

ACCEPT = "accept"
REJECT = "reject"
REPLACE = "replace"

log = Logger(namespace="imcluster.processor.filters")


@dataclass(frozen=True)
class Verdict:
    """What a filter decided about one message (use the class methods)."""

    action: str
    reason: str | None = None
    body: Any = None

    @classmethod
    def accept(cls) -> "Verdict":
        """Let the message through unchanged."""
        return _ACCEPTED

    @classmethod
    def reject(cls, reason: str) -> "Verdict":
        """Refuse the message: the sender gets ``rejected`` with ``reason``; nothing is stored."""
        return cls(REJECT, reason=reason)

    @classmethod
    def replace(cls, body: Any) -> "Verdict":
        """Store and deliver ``body`` instead of the message's body."""
        return cls(REPLACE, body=body)

    @property
    def accepted(self) -> bool:
        return self.action != REJECT


_ACCEPTED = Verdict(ACCEPT)


class IMessageFilterFactory(Interface):
    """A Twisted plugin that builds a moderation filter (found with ``getPlugins``)."""

    name = Attribute("the name used in --filters")
    description = Attribute("one line for operators")

    def build(config):
        """An :class:`IMessageFilter` configured from ``config`` (ConfigError when it cannot be)."""


@implementer(IPlugin, IMessageFilterFactory)
class FilterPlugin:
    """A plugin object: ``name`` in ``--filters`` builds a filter with ``factory(config)``."""

    def __init__(self, name: str, factory: Callable[[Any], Any], description: str) -> None:
        self.name = name
        self.factory = factory
        self.description = description

    def build(self, config: Any) -> Any:
        return self.factory(config)


# --- the keyword filter --------------------------------------------------------

#: characters that make up an ASCII word: an ASCII entry matches only as a whole word
_ASCII_WORD = "A-Za-z0-9_"


def default_words_path() -> Path:
    """``imcluster/data/badwords.txt``, shipped as package data: the word list when ``moderation_words`` is unset.

    An installed processor (a wheel, no source tree) moderates as a checkout does.
    """
    from importlib import resources

    return Path(str(resources.files("imcluster").joinpath("data", "badwords.txt")))


def read_words(path: str | Path) -> list[str]:
    """The words of a word-list file: one a line; blank lines and ``#`` comments skipped."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"moderation_words: cannot read {path}: {e}") from None
    words = []
    for line in text.splitlines():
        word = line.strip()
        if word and not word.startswith("#"):
            words.append(word)
    return words


@implementer(IMessageFilter)
class KeywordFilter:
    """Rejects (or masks) messages containing a listed word, case-insensitively.

    Every string of the body is searched, object keys included. An entry of
    ASCII letters and digits matches only as a whole word (``ass`` does not
    match ``class``); any other entry (e.g. Chinese, which has no spaces
    between words) matches anywhere. ``action`` ``reject`` (the default)
    refuses the message; ``replace`` masks each match with ``*``.
    """

    name = "keyword"
    #: calling it has no effect but its verdict: the pipeline may run it on a duplicate
    #: and look the message up only when it refuses (handlers/message.py)
    pure = True

    def __init__(self, words: Iterable[str], action: str = REJECT) -> None:
        if action not in (REJECT, REPLACE):
            raise ConfigError(f"moderation_action must be reject or replace, not {action!r}")
        self.action = action
        self.words = sorted({w.strip() for w in words if w.strip()}, key=lambda w: (-len(w), w))
        self._pattern = self._compile(self.words)

    @staticmethod
    def _compile(words: Sequence[str]) -> re.Pattern | None:
        if not words:
            return None
        parts = []
        for w in words:
            escaped = re.escape(w)
            if w.isascii():
                # whole words only: no ASCII letter or digit on either side
                escaped = f"(?<![{_ASCII_WORD}]){escaped}(?![{_ASCII_WORD}])"
            parts.append(escaped)
        # longest first, so that a phrase wins over a word it contains
        return re.compile("|".join(parts), re.IGNORECASE)

    def find(self, body: Any) -> str | None:
        """The first listed word found in any string of ``body``, or None."""
        pattern = self._pattern
        if pattern is None:
            return None
        for text in _strings(body):
            m = pattern.search(text)
            if m is not None:
                return m.group(0)
        return None

    def mask(self, body: Any) -> Any:
        """``body`` with every match replaced by as many ``*``."""
        pattern = self._pattern
        if pattern is None:
            return body

        def sub(text: str) -> str:
            return pattern.sub(lambda m: "*" * len(m.group(0)), text)

        return _map_strings(body, sub)

    def check(self, message: dict) -> Verdict:
        """Reject or mask a message whose body holds a listed word; accept the others."""
        body = message.get("body")
        word = self.find(body)
        if word is None:
            return Verdict.accept()
        if self.action == REPLACE:
            return Verdict.replace(self.mask(body))
        return Verdict.reject("the message contains a word that is not allowed")


def _strings(value: Any) -> Iterable[str]:
    """Every string in a JSON value (object keys included), without recursion."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            yield v
        elif isinstance(v, dict):
            for k, item in v.items():
                if isinstance(k, str):
                    yield k
                stack.append(item)
        elif isinstance(v, (list, tuple)):
            stack.extend(v)


def _map_strings(value: Any, fn: Callable[[str], str]) -> Any:
    """A copy of a JSON value with ``fn`` applied to every string (keys included)."""
    if isinstance(value, str):
        return fn(value)
    if isinstance(value, dict):
        return {fn(k) if isinstance(k, str) else k: _map_strings(v, fn) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_map_strings(v, fn) for v in value]
    return value


def keyword_filter(config: Any) -> KeywordFilter:
    """The ``keyword`` plugin: words from ``moderation_words`` (default: the shipped ``imcluster/data/badwords.txt``)."""
    path = config.values.get("moderation_words")
    action = config.values.get("moderation_action") or REJECT
    if path is None:
        path = default_words_path()
        if not path.is_file():
            log.warn("keyword filter: no moderation_words given and no {path}; it accepts everything",
                     path=str(path))
            return KeywordFilter([], action)
    words = read_words(path)
    log.info("keyword filter: {n} words from {path}, action {action}", n=len(words), path=str(path),
             action=action)
    return KeywordFilter(words, action)


# --- loading --------------------------------------------------------------------


def filter_plugins() -> dict[str, IMessageFilterFactory]:
    """Installed filter plugins by name."""
    from twisted import plugins

    return {p.name: p for p in getPlugins(IMessageFilterFactory, plugins)}


def load_filter(name: str, config: Any, plugins: dict | None = None) -> Any:
    """Build the filter ``name`` (plugin name or dotted ``package.module.factory``); ConfigError if unknown."""
    if "." in name:
        try:
            factory = namedAny(name)
        except Exception as e:
            raise ConfigError(f"filters: cannot import {name!r}: {e}") from None
        if not callable(factory):
            raise ConfigError(f"filters: {name!r} is not a callable factory(config)")
        built = factory(config)
    else:
        plugins = filter_plugins() if plugins is None else plugins
        plugin = plugins.get(name)
        if plugin is None:
            known = ", ".join(sorted(plugins)) or "none"
            raise ConfigError(f"filters: unknown filter {name!r} (plugins: {known}; or give package.module.factory)")
        built = plugin.build(config)
    try:
        verifyObject(IMessageFilter, built, tentative=True)  # duck typing is enough
    except Exception as e:
        raise ConfigError(f"filters: {name!r} did not build an IMessageFilter: {e}") from None
    return built


def load_filters(config: Any) -> list:
    """The filters of ``config.filters``, in order (ConfigError for an unknown or broken one)."""
    names = list(config.values.get("filters") or [])
    plugins = filter_plugins() if any("." not in n for n in names) else {}
    return [load_filter(name, config, plugins) for name in names]


# --- running --------------------------------------------------------------------


def apply_filters(filters: Sequence[Any], message: dict) -> Verdict | defer.Deferred:
    """Run ``filters`` in order on ``message``; the combined verdict (a Deferred only if a filter returned one).

    The result is ``reject`` (the first rejection) or ``accept``/``replace``
    with the body the last filter left. A filter that raises fails the
    whole call (the processor retries the batch; see service.py).
    """
    original = message.get("body")
    return _run(list(filters), 0, dict(message), original)


def _combine(message: dict, original: Any) -> Verdict:
    body = message.get("body")
    return Verdict.accept() if body is original else Verdict.replace(body)


def _run(filters: list, start: int, message: dict, original: Any) -> Verdict | defer.Deferred:
    for i in range(start, len(filters)):
        verdict = filters[i].check(message)
        if isinstance(verdict, defer.Deferred):
            def resumed(v: Verdict, i: int = i) -> Any:
                stop = _apply(v, message, filters[i])
                if stop is not None:
                    return stop
                return _run(filters, i + 1, message, original)

            return verdict.addCallback(resumed)
        stop = _apply(verdict, message, filters[i])
        if stop is not None:
            return stop
    return _combine(message, original)


def _apply(verdict: Any, message: dict, flt: Any) -> Verdict | None:
    """Apply one filter's verdict to ``message``; the final verdict when it is a rejection."""
    if not isinstance(verdict, Verdict):
        raise TypeError(f"filter {getattr(flt, 'name', flt)!r} returned {verdict!r}, not a Verdict")
    if verdict.action == REJECT:
        return verdict
    if verdict.action == REPLACE:
        message["body"] = verdict.body
    return None
