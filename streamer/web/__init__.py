"""The operator's web console: a supervisor child that serves a page of live streams, events, prompts and
recordings. It is a client of the daemon like any other (the event PUB socket and the control socket); the only
part that runs inside the worker is `preview`, which encodes the JPEG previews the page shows."""
