"""The one exception type that stops an ingest before any image is touched."""

from nnssl.errors import UserError


class IngestError(UserError):
    """A problem with the command itself (environment, dataset ID, input paths): nothing was written.

    Problems with single images are never raised; they become rejections in the summary instead.
    """
