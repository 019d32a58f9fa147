"""The parts of `amc_mobile.report` (which assembles them; import from there): `render` (blocks -> HTML /
Markdown), `folder` (reading a run folder), and one section per run kind (`*_section`)."""
