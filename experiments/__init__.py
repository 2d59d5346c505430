"""Experiments: functions returning a ``lcjax.config.Config``, found by name.

Add one by writing a function decorated with ``@register`` in any module here;
derive from an existing experiment with ``lcjax.config.replace``/``override``.
"""
