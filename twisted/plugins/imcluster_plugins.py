"""twistd plugins of imcluster: ``twistd imgateway``, ``twistd improcessor``, ``twistd imapi``, ``twistd impush``.

No ``__init__.py`` lives in this folder: it would shadow Twisted's own.
"""

from twisted.application.service import ServiceMaker

imgateway = ServiceMaker(
    "imcluster gateway", "imcluster.gateway.tap",
    "WebSocket and raw TCP client gateway of imcluster", "imgateway")
improcessor = ServiceMaker(
    "imcluster processor", "imcluster.processor.tap",
    "Message processor of imcluster: stores, orders and routes messages", "improcessor")
imapi = ServiceMaker(
    "imcluster HTTP API", "imcluster.api.tap",
    "HTTP API, metrics and health of imcluster", "imapi")
impush = ServiceMaker(
    "imcluster push", "imcluster.push.tap",
    "Offline push of imcluster: push requests to the business's push relay", "impush")
