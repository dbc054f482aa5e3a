// cnnkit web app's service worker: every file of the app is saved on install, then served
// from that cache, so the app opens and classifies with no network. cnnkit writes the list
// and the cache name at export time; the name is a hash of every file's content, so a new
// export installs a new cache and removes this app's older ones (never another app's).
const CACHE = "__CACHE__";
const FILES = __FILES__;
const PREFIX = "cnnkit-webapp " + self.registration.scope + " ";
const NAME = PREFIX + CACHE;

self.addEventListener("install", (event) => {
  event.waitUntil(
    caches.open(NAME)
      // cache: "reload": the files as they are now on the host, not an old HTTP-cache copy
      .then((cache) => cache.addAll(FILES.map((f) => new Request(f, { cache: "reload" }))))
      .then(() => self.skipWaiting()),
  );
});

self.addEventListener("activate", (event) => {
  event.waitUntil(
    caches.keys()
      .then((keys) => Promise.all(
        keys.filter((k) => k.startsWith(PREFIX) && k !== NAME).map((k) => caches.delete(k)),
      ))
      .then(() => self.clients.claim()),
  );
});

self.addEventListener("fetch", (event) => {
  const request = event.request;
  if (request.method !== "GET" || !request.url.startsWith(self.registration.scope)) return;
  event.respondWith((async () => {
    const cache = await caches.open(NAME);
    let hit = await cache.match(request, { ignoreSearch: true });
    if (!hit && request.mode === "navigate") hit = await cache.match("index.html");
    return hit || fetch(request);
  })());
});
