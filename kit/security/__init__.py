"""Hardening for a public microsite: access control, job limits, safe inputs and files.

``guard_for(services)`` builds a site's ``SiteGuard`` from the preset's ``[security]`` section;
``kit.site.launch_options`` installs ``SiteGuardMiddleware`` with it, and the generate and
describe validators call ``admit_job``. See docs/security.md for the threat model.
"""

from kit.security.guard import SiteGuard, admit_job, guard_for

__all__ = ["SiteGuard", "admit_job", "guard_for"]
