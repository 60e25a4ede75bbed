// Bare JavaScript pass-through Worker: the floor of this runtime. Forwards every request to
// env.UPSTREAM (same method, path, headers, body) and returns the upstream response as is.
export default {
  async fetch(request, env) {
    const url = new URL(request.url);
    return fetch(new Request(env.UPSTREAM + url.pathname + url.search, request));
  },
};
