"""td3drive: distributed TD3 from pixels on Ray.

This package holds the shared contracts (:mod:`td3drive.spec`,
:mod:`td3drive.config`, :mod:`td3drive.metric_names`), the CLI and, later, the
driver. Services import the contracts only.
"""

__version__ = "0.1.0"
