// `memo` without preact/compat: a component that re-renders only when a prop changed identity.
import { Component, type ComponentChildren, type FunctionComponent, h } from "preact";

function shallowEqual(a: Record<string, unknown>, b: Record<string, unknown>): boolean {
  for (const key in a) if (key !== "children" && a[key] !== b[key]) return false;
  for (const key in b) if (!(key in a)) return false;
  return true;
}

export function memo<P extends object>(render: FunctionComponent<P>): FunctionComponent<P> {
  class Memo extends Component<P> {
    override shouldComponentUpdate(next: P): boolean {
      return !shallowEqual(this.props as Record<string, unknown>, next as Record<string, unknown>);
    }
    override render(): ComponentChildren {
      return h(render, this.props);
    }
  }
  (Memo as unknown as { displayName: string }).displayName = `Memo(${render.displayName ?? render.name})`;
  return Memo as unknown as FunctionComponent<P>;
}
