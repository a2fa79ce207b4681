/*
 * gateway-caller: a test guest for the cluster tests. An HTTP/1.0 server on
 * port 8080; for each request for /SERVICE it asks SERVICE through the
 * gateway of its own node (UIGNITER_GATEWAY_HOST and _HTTP_PORT, which every
 * replica has in its environment) with GET /svc/SERVICE/ and answers with
 * the status line and body it got. Only for tests: no keep-alive, one
 * request at a time.
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

static void answer(int c, const char *status, const char *body, size_t n) {
    char head[256];
    int h = snprintf(head, sizeof head, "HTTP/1.0 %s\r\nContent-Type: text/plain\r\nContent-Length: %zu\r\nConnection: close\r\n\r\n", status, n);
    (void)send(c, head, (size_t)h, MSG_NOSIGNAL);
    (void)send(c, body, n, MSG_NOSIGNAL);
}

/* Asks the gateway for /svc/SERVICE/ and copies its whole answer into out. */
static ssize_t ask(const char *service, char *out, size_t cap) {
    const char *host = getenv("UIGNITER_GATEWAY_HOST");
    const char *port = getenv("UIGNITER_GATEWAY_HTTP_PORT");
    if (host == NULL || port == NULL) return -1;
    int s = socket(AF_INET, SOCK_STREAM, 0);
    struct timeval tv = { .tv_sec = 10 };
    setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons((unsigned short)atoi(port)) };
    if (s < 0 || inet_pton(AF_INET, host, &a.sin_addr) != 1 || connect(s, (struct sockaddr *)&a, sizeof a) < 0) { if (s >= 0) close(s); return -1; }
    char req[256];
    int n = snprintf(req, sizeof req, "GET /svc/%s/ HTTP/1.0\r\nHost: %s\r\n\r\n", service, host);
    (void)send(s, req, (size_t)n, MSG_NOSIGNAL);
    size_t got = 0;
    ssize_t r;
    while (got < cap && (r = recv(s, out + got, cap - got, 0)) > 0) got += (size_t)r;
    close(s);
    return (ssize_t)got;
}

int main(void) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in addr = { .sin_family = AF_INET, .sin_port = htons(8080), .sin_addr.s_addr = htonl(INADDR_ANY) };
    if (fd < 0 || bind(fd, (struct sockaddr *)&addr, sizeof addr) < 0 || listen(fd, 16) < 0) { perror("gateway-caller"); return 1; }
    printf("gateway-caller: listening on :8080\n");
    fflush(stdout);
    for (;;) {
        int c = accept(fd, NULL, NULL);
        if (c < 0) continue;
        char buf[2048] = { 0 };
        ssize_t n = recv(c, buf, sizeof buf - 1, 0);
        char service[64] = "";
        /* "GET /SERVICE ..." : letters, digits and dashes only. */
        if (n > 5 && strncmp(buf, "GET /", 5) == 0) {
            size_t i = 0;
            for (const char *p = buf + 5; i < sizeof service - 1 && ((*p >= 'a' && *p <= 'z') || (*p >= '0' && *p <= '9') || *p == '-'); p++) service[i++] = *p;
            service[i] = 0;
        }
        if (service[0] == 0) { answer(c, "200 OK", "gateway-caller\n", 15); close(c); continue; }
        static char got[65536];
        ssize_t g = ask(service, got, sizeof got);
        if (g < 0) answer(c, "502 Bad Gateway", "no answer from the gateway\n", 27);
        else answer(c, "200 OK", got, (size_t)g);
        close(c);
    }
}
