"""Plugin system: pluggy hookspecs (`hookspecs`), the manager and op resolution (`manager`)."""
import pluggy

hookimpl = pluggy.HookimplMarker("dsv3")
