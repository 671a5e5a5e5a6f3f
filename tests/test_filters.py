"""Moderation filters: the keyword filter, loading by plugin or dotted name, running in order."""

from __future__ import annotations

import pytest
from twisted.internet import defer
from twisted.python import usage
from zope.interface.verify import verifyObject

from imcluster.config import PROCESSOR, ConfigError, load_config
from imcluster.interfaces import IMessageFilter
from imcluster.processor import filters as F
from imcluster.processor.filters import KeywordFilter, Verdict, apply_filters, load_filters


def config(**values):
    return load_config(PROCESSOR, {}, environ={}).replace(**values)


def msg(body):
    return {"from": "alice", "sessionId": "s", "clientMsgId": "c", "body": body}


def test_keyword_filter_finds_words_in_every_string_case_insensitively():
    """A forbidden word hidden in a nested field, a key or another case would get through."""
    f = KeywordFilter(["darn", "坏词", "free bitcoin"])
    verifyObject(IMessageFilter, f)
    assert f.check(msg({"text": "fine"})).action == "accept"
    assert f.check(msg({"a": [{"b": "oh DaRn"}]})).action == "reject"
    assert f.check(msg({"darn": 1})).action == "reject"
    assert f.check(msg("这是坏词吗")).action == "reject"  # no spaces between Chinese words
    assert f.check(msg(["get FREE Bitcoin now"])).action == "reject"
    assert f.check(msg(42)).action == "accept"
    assert f.check(msg(None)).action == "accept"


def test_ascii_words_match_whole_words_only():
    """Innocent words containing a listed word (Scunthorpe) would be refused."""
    f = KeywordFilter(["ass"])
    assert f.check(msg("a class act")).action == "accept"
    assert f.check(msg("passing")).action == "accept"
    assert f.check(msg("what an ass!")).action == "reject"
    assert f.check(msg("ass_hat")).action == "accept"


def test_replace_action_masks_the_words():
    """With replace configured, messages would be refused instead of masked."""
    f = KeywordFilter(["darn"], action="replace")
    v = f.check(msg({"t": "Darn, darn it", "n": 1, "l": ["x darn"]}))
    assert v == Verdict.replace({"t": "****, **** it", "n": 1, "l": ["x ****"]})


def test_apply_filters_runs_in_order_and_stops_at_a_rejection():
    """A later filter would see the original body, or run after a rejection."""
    seen = []

    class Upper:
        name = "upper"

        def check(self, m):
            seen.append(("upper", m["body"]))
            return defer.succeed(Verdict.replace(m["body"].upper()))

    class Last:
        name = "last"

        def check(self, m):
            seen.append(("last", m["body"]))
            return Verdict.accept()

    result = []
    apply_filters([Upper(), Last()], msg("hello")).addCallback(result.append)
    assert result == [Verdict.replace("HELLO")]
    assert seen == [("upper", "hello"), ("last", "HELLO")]
    seen.clear()
    assert apply_filters([KeywordFilter(["hello"]), Last()], msg("hello")).action == "reject"
    assert seen == []
    assert apply_filters([], msg("x")) == Verdict.accept()


def test_a_filter_returning_garbage_fails_loudly():
    """A broken filter would silently accept everything."""
    class Broken:
        name = "broken"

        def check(self, m):
            return True

    with pytest.raises(TypeError):
        apply_filters([Broken()], msg("x"))


def test_keyword_plugin_loads_its_word_list(tmp_path):
    """The default 'keyword' filter would be missing or ignore --moderation-words."""
    words = tmp_path / "words.txt"
    words.write_text("# comment\n\nfoo\n  Bar  \n", encoding="utf-8")
    [f] = load_filters(config(filters=["keyword"], moderation_words=str(words), moderation_action="replace"))
    assert isinstance(f, KeywordFilter) and f.words == ["Bar", "foo"] and f.action == "replace"
    [default] = load_filters(config(filters=["keyword"]))
    assert default.words  # imcluster/data/badwords.txt (package data)
    assert default.check(msg("hello there")).action == "accept"


def test_dotted_name_loads_a_factory():
    """Operators could not plug in their own moderation service."""
    [f] = load_filters(config(filters=["tests.test_filters.make_noop"]))
    assert f.name == "noop"


class Noop:
    name = "noop"

    def check(self, message):
        return Verdict.accept()


def make_noop(config):
    return Noop()


def make_nothing(config):
    return object()


@pytest.mark.parametrize("names, words, error", [
    (["nope"], None, "unknown filter 'nope'"),
    (["no.such.module"], None, "cannot import"),
    (["tests.test_filters.make_nothing"], None, "did not build an IMessageFilter"),
    (["keyword"], "/no/such/file", "cannot read"),
])
def test_bad_filter_configuration_is_refused_before_start(names, words, error):
    """A typo in --filters would start a processor that moderates nothing."""
    with pytest.raises(ConfigError, match=error):
        load_filters(config(filters=names, moderation_words=words))


def test_twistd_options_refuse_an_unknown_filter():
    """twistd improcessor would start (and crash later) with a bad filter name."""
    from imcluster.processor.tap import Options

    with pytest.raises(usage.UsageError, match="unknown filter"):
        Options().parseOptions(["--filters", "keyword,nope"])
    o = Options()
    o.parseOptions(["--filters", "keyword"])
    assert [f.name for f in o.filters] == ["keyword"]


def test_default_word_list_ships_in_the_tree():
    """The default filter would load nothing."""
    assert F.default_words_path().is_file()
    assert "fuck" in F.read_words(F.default_words_path())
