"""Virus scanning with ClamAV's daemon (runtime side: sockets and processes).

- ``scanner``: the scanners the runtime answers the engine's ``Scan`` command with
  (``make_scanner(cfg)``): ``ClamdScanner`` (clamd's INSTREAM over a unix socket or TCP) and
  ``NullScanner`` (scanning disabled).
- ``clamd``: a clamd of pecd's own (its config file, starting it, waiting until it answers,
  stopping it): the tests, ``pecd init`` and ``pecd serve`` with ``antivirus.managed``.
- ``testsigs``: the signature database pecd generates itself (EICAR and a project signature).
"""
