"""Grounded editing on video: redaction, removal and search of what words describe.

Built on the model's detection path (`gdino.predict`) and the tracker; the model package stays a model.
"""
