"""Log observers for ``twistd --logger``.

``twistd --logger=imcluster.logs.json_observer imgateway ...`` writes one JSON
event a line on standard output: journald (and any log shipper) keeps the
structured fields.
"""

import sys

from twisted.logger import jsonFileLogObserver


def json_observer():
    """One JSON object a line on stdout (no record separator)."""
    return jsonFileLogObserver(sys.stdout, recordSeparator="")
