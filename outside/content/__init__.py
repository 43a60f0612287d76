"""The outside content-security pipeline (issue 4).

``ContentPipeline`` (pipeline.py) runs every file through identify -> limits -> sanitize ->
scan -> validate in isolated worker processes (worker.py) and returns a
:class:`ferry.content.base.Verdict`. See docs/CONTENT.md.
"""
