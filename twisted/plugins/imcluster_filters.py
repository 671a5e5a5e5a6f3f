"""Moderation filter plugins of imcluster (``--filters keyword``).

No ``__init__.py`` lives in this folder: it would shadow Twisted's own.
Other packages add filters the same way: a module in their own
``twisted/plugins/`` holding a :class:`imcluster.processor.filters.FilterPlugin`.
"""

from imcluster.processor.filters import FilterPlugin, keyword_filter

keyword = FilterPlugin(
    "keyword", keyword_filter,
    "rejects (or masks) messages holding a word of --moderation-words, case-insensitively")
