"""The lbd daemon: a thin asyncio shell around lbd.protocol plus lbd.netcfg.

cli.py (``lbd``), ctl.py (``lbd-cli``), config.py (the TOML settings), service.py (the
event loop), control.py (the Unix control socket) and notify.py (sd_notify, journal).
"""
